"""Build the `mlp` benchmark model: a 3x512 ReLU MLP over 30 FP32 features, with its card.

A heavier model than the credit-risk example (about 0.54 M multiply-adds per row; a batch-1
onnxruntime run costs roughly 100-200 µs on one thread), for benchmarks where dynamic batching
matters. Deterministic from one seed: the same dev dependencies give the same ONNX bytes and
the same card. Dev-only (numpy, onnx, onnxruntime):

    python models/build_mlp.py --out DIR     # writes DIR/mlp/1/model.onnx and DIR/mlp/1/model.yaml
    python models/build_mlp.py               # the same into $TMPDIR/mlp-repository

It is not part of the served example repository (`models/`): the benchmark builds it into a
temporary directory. The weights are seeded random numbers (He initialisation), not trained; the
read-out layer is standardised so the score spreads over (0, 1) on the reference rows.

Inputs are one `[N, 1]` FP32 tensor per feature (`f00` .. `f29`), concatenated inside the graph:
the layout the gateway supports best (a policy feature per input, with its own range, drift
histogram and fallback conditions); a single `[N, 30]` tensor could only be checked against the
signature. Outputs: `probabilities` `[N, 2]` (softmax) and `label` `[N]` (argmax, INT64).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

SEED = 20260531
MODEL_NAME = "mlp"
VERSION = "1"
FEATURES = [f"f{i:02d}" for i in range(30)]
HIDDEN = (512, 512, 512)
REFERENCE_ROWS = 5000
REFERENCE_BINS = 10
GOLDEN = 12
OPSET = 17
IR_VERSION = 8  # the IR version of opset 17, pinned so a newer onnx package writes the same bytes


def feature_distribution(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of the synthetic inputs (tabular-looking: not all unit normal)."""
    means = np.round(rng.uniform(-2.0, 2.0, size=len(FEATURES)), 3)
    scales = np.round(rng.uniform(0.5, 3.0, size=len(FEATURES)), 3)
    return means, scales


def reference_rows(rng: np.random.Generator, means: np.ndarray, scales: np.ndarray, rows: int) -> np.ndarray:
    """Synthetic input rows, rounded to 4 decimals so YAML round-trips them exactly (float64)."""
    return np.round(means + scales * rng.standard_normal((rows, len(FEATURES))), 4)


def layers(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight [in, out], bias [out]) per layer, float64, He-initialised; the read-out still unscaled."""
    sizes = [len(FEATURES), *HIDDEN, 2]
    out = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        weight = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        bias = rng.normal(0.0, 0.01, size=fan_out)
        out.append((weight, bias))
    return out


def forward_logits(rows: np.ndarray, means: np.ndarray, scales: np.ndarray,
                   weights: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The network's logits in float64 (used to standardise the read-out)."""
    h = (rows - means) / scales
    for weight, bias in weights[:-1]:
        h = np.maximum(h @ weight + bias, 0.0)
    weight, bias = weights[-1]
    return h @ weight + bias


def standardise_readout(rows: np.ndarray, means: np.ndarray, scales: np.ndarray,
                        weights: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Scale and shift the last layer so the logit gap (class 1 - class 0) has median 0 and std 1.5."""
    logits = forward_logits(rows, means, scales, weights)
    gap = logits[:, 1] - logits[:, 0]
    factor = 1.5 / float(gap.std())
    weight, bias = weights[-1]
    weight = weight * factor
    bias = bias * factor
    shift = float(np.median(gap)) * factor
    bias = bias + np.array([shift / 2, -shift / 2])
    return [*weights[:-1], (weight, bias)]


def onnx_bytes(means: np.ndarray, scales: np.ndarray, weights: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """The ONNX graph: Concat the features, standardise, Gemm+Relu x3, Gemm, Softmax and ArgMax."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: np.ndarray) -> Any:
        return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)

    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 1]) for name in FEATURES]
    outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])]
    initializers = [const("mean", means), const("inv_scale", 1.0 / scales)]
    nodes = [helper.make_node("Concat", FEATURES, ["x"], axis=1, name="concat"),
             helper.make_node("Sub", ["x", "mean"], ["centred"], name="centre"),
             helper.make_node("Mul", ["centred", "inv_scale"], ["h0"], name="scale")]
    for i, (weight, bias) in enumerate(weights, start=1):
        initializers += [const(f"w{i}", weight), const(f"b{i}", bias)]
        last = i == len(weights)
        target = "logits" if last else f"z{i}"
        nodes.append(helper.make_node("Gemm", [f"h{i - 1}", f"w{i}", f"b{i}"], [target], name=f"dense{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [target], [f"h{i}"], name=f"relu{i}"))
    nodes += [helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
              helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0, name="argmax")]
    graph = helper.make_graph(nodes, "mlp", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="build_mlp.py", producer_version="1")
    model.ir_version = IR_VERSION
    from onnx import checker

    checker.check_model(model)
    return bytes(model.SerializeToString())


def feeds(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Feed dict (one [N, 1] FP32 tensor per feature) for a matrix of rows."""
    data = rows.astype(np.float32)
    return {name: data[:, [i]] for i, name in enumerate(FEATURES)}


def signature_of(session: Any) -> dict[str, list[dict[str, Any]]]:
    """Model signature in protocol terms, read from an onnxruntime session."""
    dtypes = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}

    def describe(args: Any) -> list[dict[str, Any]]:
        return [{"name": a.name, "datatype": dtypes[a.type],
                 "shape": [d if isinstance(d, int) else -1 for d in a.shape]} for a in args]

    return {"inputs": describe(session.get_inputs()), "outputs": describe(session.get_outputs())}


def quantile_histogram(values: np.ndarray) -> dict[str, list[float]]:
    """Inner bin edges at the deciles (deduplicated) and the share of values in each bin."""
    edges = np.unique(np.quantile(values, np.linspace(0, 1, REFERENCE_BINS + 1)[1:-1]))
    index = np.searchsorted(edges, values, side="left")
    frequencies = np.bincount(index, minlength=len(edges) + 1) / len(values)
    return {"bin_edges": [round(float(e), 6) for e in edges],
            "frequencies": [round(float(f), 6) for f in frequencies]}


def reference_profile(rows: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Per-feature decile bins of the reference rows and the score distribution (for online drift)."""
    features = {name: {"kind": "numeric", **quantile_histogram(rows[:, i]), "missing_rate": 0.0,
                       "min": float(rows[:, i].min()), "max": float(rows[:, i].max())}
                for i, name in enumerate(FEATURES)}
    return {"rows": len(rows), "features": features,
            "prediction": {"output": "probabilities", "index": 1, **quantile_histogram(scores)}}


def golden_examples(rows: np.ndarray, session: Any) -> list[dict[str, Any]]:
    """Inputs and the exact outputs of the ONNX file, for the first reference rows."""
    picked = rows[:GOLDEN]
    label, probabilities = session.run(None, feeds(picked))
    return [{"id": f"golden-{i:02d}",
             "inputs": {name: float(picked[i, j]) for j, name in enumerate(FEATURES)},
             "outputs": {"label": int(label[i]), "probabilities": [round(float(p), 7) for p in probabilities[i]]}}
            for i in range(len(picked))]


def build(out: Path) -> Path:
    """Write out/mlp/1/model.onnx and its card; returns the version directory."""
    import onnxruntime as ort

    rng = np.random.default_rng(SEED)
    means, scales = feature_distribution(rng)
    weights = layers(rng)
    rows = reference_rows(rng, means, scales, REFERENCE_ROWS)
    weights = standardise_readout(rows, means, scales, weights)
    model = onnx_bytes(means, scales, weights)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    _, probabilities = session.run(None, feeds(rows))
    csv = "\n".join([",".join(FEATURES), *(",".join(f"{v:.4f}" for v in row) for row in rows)]) + "\n"
    card = {
        "name": MODEL_NAME,
        "version": VERSION,
        "description": "Benchmark model: 3x512 ReLU MLP over 30 FP32 features, class probabilities and "
                       "label (seeded random weights, not trained).",
        "owner": "platform@example.com",
        "platform": "onnxruntime_onnx",
        "sha256": hashlib.sha256(model).hexdigest(),
        "signature": signature_of(session),
        "score": {"output": "probabilities", "index": 1, "positive_label": 1},
        "training_data": {
            "description": f"No training: {REFERENCE_ROWS} synthetic reference rows (build_mlp.py, seed {SEED}) "
                           "standardise the read-out and give the reference profile; sha256 of their CSV.",
            "sha256": hashlib.sha256(csv.encode()).hexdigest(),
            "rows": REFERENCE_ROWS,
        },
        "reference_profile": reference_profile(rows, probabilities[:, 1].astype(np.float64)),
        "golden": golden_examples(rows, session),
    }
    version_dir = out / MODEL_NAME / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.onnx").write_bytes(model)
    (version_dir / "model.yaml").write_text(
        "# Generated by models/build_mlp.py; do not edit by hand.\n"
        + yaml.safe_dump(card, sort_keys=False, width=100, allow_unicode=True))
    return version_dir


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "mlp-repository",
                        help="model repository root to write into (default: $TMPDIR/mlp-repository; "
                             "not models/, which the test suite serves)")
    print(build(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
