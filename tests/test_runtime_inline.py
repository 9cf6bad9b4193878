"""InlineRunner (runs on the calling thread under a deadline watchdog) and where each version runs."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from gateway.card import Signature, TensorSpec
from gateway.errors import InferenceFailed, InferenceTimeout
from gateway.policy import Batching, Policy, load_policy
from gateway.policy_fit import policy_misfits
from gateway.registry import INLINE_MAX_RUN_MS, BreakerBoard, build_snapshot, serve_version
from gateway.repository import ModelRepository, ModelVersion
from gateway.runtime import BeforeRun, InlineRunner, OnnxModel, RunControl, RuntimeOptions
from gateway.tensors import NUMPY_DTYPES
from tests.conftest import MODEL, MODELS, POLICIES, good_row, make_client, patch_policy, v2_body

WAIT_S = 5.0
"""Upper bound for waiting on the watchdog thread (never reached when things work)."""
BATCHING_MISFIT = "batching needs a variable first (batch) dimension"


# --- models -------------------------------------------------------------------------------------

def onnx_bytes(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
               outputs: list[onnx.ValueInfoProto], initializers: list[onnx.TensorProto] | None = None) -> bytes:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def slow_model_bytes(matmuls: int = 200, size: int = 512) -> bytes:
    """x[N, size] multiplied `matmuls` times by an orthogonal matrix: one 512-row run takes ~0.5 s here."""
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((size, size)))
    weight = numpy_helper.from_array(q.astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", "w"],
                              ["y" if i == matmuls - 1 else f"h{i}"]) for i in range(matmuls)]
    return onnx_bytes(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", size])], [weight])


def doubling_model_bytes(first_dim: int | str) -> bytes:
    """y = 2 * x with x, y of shape [first_dim, 1] (a fixed or a variable batch dimension)."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    return onnx_bytes([helper.make_node("Mul", ["x", "two"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [first_dim, 1])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [first_dim, 1])], [two])


@pytest.fixture(scope="module")
def slow_model() -> OnnxModel:
    return OnnxModel(slow_model_bytes(), RuntimeOptions())


@pytest.fixture(scope="module")
def small_model() -> OnnxModel:
    entry = ModelRepository(MODELS, RuntimeOptions()).load_version(MODEL, "1")
    assert entry.ready and entry.model is not None, entry.reason
    return entry.model


@pytest.fixture
def runner() -> Iterator[InlineRunner]:
    inline = InlineRunner()
    yield inline
    inline.close()


def row_feeds(model: OnnxModel) -> dict[str, np.ndarray]:
    """One good credit-risk row as feeds."""
    row = good_row()
    return {t.name: np.array([[row[t.name]]], dtype=NUMPY_DTYPES[t.datatype]) for t in model.signature.inputs}


class Counting:
    """Stands in for an OnnxModel: counts the runs it is asked for, delegates them."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.calls = 0

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
            control: RunControl | None = None, before_run: BeforeRun | None = None) -> dict[str, np.ndarray]:
        self.calls += 1
        return self.model.run(feeds, outputs, control, before_run)


def wait_for(condition: Callable[[], bool]) -> bool:
    end = time.monotonic() + WAIT_S
    while not condition() and time.monotonic() < end:
        time.sleep(0.001)
    return condition()


# --- InlineRunner ---------------------------------------------------------------------------------

def test_an_overrunning_inline_run_is_terminated_at_its_deadline(
        slow_model: OnnxModel, small_model: OnnxModel, runner: InlineRunner) -> None:
    x = np.random.default_rng(1).standard_normal((512, 512)).astype(np.float32)
    with pytest.raises(InferenceTimeout, match="terminated"):
        runner.run(slow_model, {"x": x}, None, time.monotonic() + 0.05)
    assert wait_for(lambda: runner.terminated >= 1)  # the watchdog counts right after it cancels
    assert runner.terminated == 1
    # the runner is free again: runs without a deadline, or within one, answer
    answer = runner.run(small_model, row_feeds(small_model), None, None)
    assert answer["label"].shape == (1,) and answer["probabilities"].shape == (1, 2)
    again = runner.run(small_model, row_feeds(small_model), ["probabilities"], time.monotonic() + 30.0)
    assert list(again) == ["probabilities"]
    np.testing.assert_array_equal(again["probabilities"], answer["probabilities"])
    assert runner.terminated == 1


def test_each_overrun_is_counted(slow_model: OnnxModel, runner: InlineRunner) -> None:
    x = np.ones((512, 512), dtype=np.float32)
    counts: list[int] = []
    for _ in range(2):
        with pytest.raises(InferenceTimeout):
            runner.run(slow_model, {"x": x}, None, time.monotonic() + 0.02)
        assert wait_for(lambda: runner.terminated > len(counts))
        counts.append(runner.terminated)
    assert counts == [1, 2]


@pytest.mark.parametrize("deadline_in", [-1.0, 0.0], ids=["past", "now"])
def test_a_passed_deadline_answers_without_running(small_model: OnnxModel, runner: InlineRunner,
                                                   deadline_in: float) -> None:
    counting = Counting(small_model)
    model = cast(OnnxModel, counting)
    with pytest.raises(InferenceTimeout, match="before the model could run"):
        runner.run(model, row_feeds(small_model), None, time.monotonic() + deadline_in)
    assert counting.calls == 0 and runner.terminated == 0
    answer = runner.run(model, row_feeds(small_model), None, time.monotonic() + 30.0)
    assert counting.calls == 1 and answer["label"].shape == (1,)


def test_a_runtime_error_inline_stays_a_runtime_error(small_model: OnnxModel, runner: InlineRunner) -> None:
    feeds = row_feeds(small_model)
    feeds["age"] = feeds["age"].astype(np.float64)  # onnxruntime refuses the wrong element type
    with pytest.raises(InferenceFailed, match="onnxruntime failed") as caught:
        runner.run(small_model, feeds, None, time.monotonic() + 30.0)
    assert not isinstance(caught.value, InferenceTimeout)
    assert runner.terminated == 0


# --- where each version runs (registry) -----------------------------------------------------------

def executions(client: Any) -> dict[str, dict[str, Any]]:
    """Per version: its status entry from /status."""
    (model,) = client.get("/status").json()["models"]
    return {v["version"]: v for v in model["versions"]}


def test_the_bundled_versions_run_inline(repo_copy: tuple[Path, Path]) -> None:
    with make_client(*repo_copy) as client:
        versions = executions(client)
        for entry in versions.values():
            assert entry["run_ms"] is not None and entry["run_ms"] <= INLINE_MAX_RUN_MS, entry
        assert {v: e["execution"] for v, e in versions.items()} == {"1": "inline", "2": "inline"}
        answer = client.post(f"/v2/models/{MODEL}/infer", json=v2_body([good_row()]))
        assert answer.status_code == 200 and "fallback" not in answer.json()["parameters"], answer.text


def test_guard_execution_thread_is_honoured(repo_copy: tuple[Path, Path]) -> None:
    models, policies = repo_copy
    patch_policy(policies, MODEL, guard={"execution": "thread"})
    with make_client(models, policies) as client:
        assert {v: e["execution"] for v, e in executions(client).items()} == {"1": "thread", "2": "thread"}
        answer = client.post(f"/v2/models/{MODEL}/infer", json=v2_body([good_row()]))
        assert answer.status_code == 200 and "fallback" not in answer.json()["parameters"], answer.text


@pytest.mark.parametrize("execution", ["auto", "inline"])
def test_a_version_with_fault_injection_runs_on_the_pool(repo_copy: tuple[Path, Path], execution: str) -> None:
    models, policies = repo_copy
    patch_policy(policies, MODEL, guard={"execution": execution},
                 faults=[{"version": "1", "delay_ms": 1, "delay_percent": 0}])
    with make_client(models, policies, allow_fault_injection=True) as client:
        versions = executions(client)
        assert versions["1"]["faults"] is not None
        assert {v: e["execution"] for v, e in versions.items()} == {"1": "thread", "2": "inline"}
        # an inline version always runs through a batcher on the loop; a pool version only with `batching`
        assert "batching" not in versions["1"] and versions["2"]["batching"]["batches"] == 0


@pytest.mark.parametrize("execution", ["inline", "thread"])
def test_a_batching_policy_runs_every_version_in_batches(repo_copy: tuple[Path, Path], execution: str) -> None:
    models, policies = repo_copy
    patch_policy(policies, MODEL, guard={"execution": execution},
                 batching={"max_batch_size": 16, "max_queue_delay_ms": 2, "max_concurrent_batches": 1})
    with make_client(models, policies) as client:
        versions = executions(client)
        # batches run on the event loop (inline) or on the pool (thread), as guard.execution says
        assert {v: e["execution"] for v, e in versions.items()} == {"1": execution, "2": execution}
        for entry in versions.values():
            assert entry["batching"]["batches"] == 0
            assert entry["batching"]["max_batch_size"] == 16 and entry["batching"]["max_queue_delay_ms"] == 2
        answer = client.post(f"/v2/models/{MODEL}/versions/1/infer", json=v2_body([good_row(), good_row()]))
        assert answer.status_code == 200 and "fallback" not in answer.json()["parameters"], answer.text
        batching = executions(client)["1"]["batching"]
        assert (batching["batches"], batching["rows"]) == (1, 2)


@pytest.mark.parametrize(("run_ms", "expected"), [
    (0.01, "inline"), (INLINE_MAX_RUN_MS, "inline"), (INLINE_MAX_RUN_MS * 1.2, "thread"), (5.0, "thread"),
    (None, "thread"),
])
def test_auto_execution_follows_the_warm_up_run_time(run_ms: float | None, expected: str) -> None:
    entry: ModelVersion = ModelRepository(MODELS, RuntimeOptions()).load_version(MODEL, "1")
    assert entry.model is not None
    entry.model.run_ms = run_ms
    policy = load_policy(POLICIES / f"{MODEL}.yaml")
    served, why = serve_version(MODEL, entry, policy, "", BreakerBoard(), None, 100)
    assert served is not None, why
    assert served.execution == expected
    assert (served.batcher is not None) == (expected == "inline")  # the policy has no `batching`


# --- batching needs a variable batch dimension --------------------------------------------------

def write_version(root: Path, name: str, model_bytes: bytes, first_dim: int) -> None:
    """A one-version repository entry with a card that matches the file."""
    version_dir = root / name / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(model_bytes)
    shape = [first_dim, 1]
    card = {"name": name, "version": "1", "owner": "tests@example.com",
            "sha256": hashlib.sha256(model_bytes).hexdigest(),
            "signature": {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape}],
                          "outputs": [{"name": "y", "datatype": "FP32", "shape": shape}]},
            "training_data": {"description": "none (a test model)", "sha256": "0" * 64}}
    (version_dir / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))


def write_policy(policies: Path, name: str, batching: bool) -> None:
    policy: dict[str, Any] = {"model": name, "schema": {"features": {"x": {"type": "float"}}}}
    if batching:
        policy["batching"] = {"max_batch_size": 8}
    policies.mkdir(exist_ok=True)
    (policies / f"{name}.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no-batching"])
def test_a_fixed_batch_dimension_is_refused_only_with_batching(tmp_path: Path, batching: bool) -> None:
    models, policies = tmp_path / "models", tmp_path / "policies"
    write_version(models, "fixed", doubling_model_bytes(4), 4)
    write_version(models, "variable", doubling_model_bytes("N"), -1)
    for name in ("fixed", "variable"):
        write_policy(policies, name, batching)
    snapshot = build_snapshot(ModelRepository(models, RuntimeOptions()), policies, 100)
    fixed, variable = snapshot.model("fixed"), snapshot.model("variable")
    served = variable.served["1"]
    assert served.execution in ("inline", "thread")
    if batching:
        assert served.batcher is not None and served.batcher.max_batch_size == 8
    else:  # only an inline version batches without a `batching` section
        assert (served.batcher is not None) == (served.execution == "inline")
    if batching:
        assert fixed.served == {}
        assert BATCHING_MISFIT in fixed.version_reasons["1"]
        assert "x [4, 1]" in fixed.version_reasons["1"] and "y [4, 1]" in fixed.version_reasons["1"]
        assert not fixed.routable
    else:
        assert fixed.served["1"].execution in ("inline", "thread") and fixed.version_reasons == {}


@pytest.mark.parametrize(("inputs", "outputs", "fixed"), [
    ([[4, 1]], [[-1, 2]], ["x [4, 1]"]),
    ([[-1, 1]], [[4]], ["y [4]"]),
    ([[-1, 1]], [[]], ["y []"]),
    ([[-1, 1]], [[-1, 2]], []),
])
def test_batching_misfits_name_every_fixed_tensor(inputs: list[list[int]], outputs: list[list[int]],
                                                  fixed: list[str]) -> None:
    policy = Policy.model_validate({"model": "m", "schema": {"features": {"x": {"type": "float"}}}, "batching": {}})
    assert policy.batching == Batching()
    signature = Signature(inputs=[TensorSpec(name="x", datatype="FP32", shape=s) for s in inputs],
                          outputs=[TensorSpec(name="y", datatype="FP32", shape=s) for s in outputs])
    misfits = [m for m in policy_misfits(policy, signature) if m.loc == ("batching",)]
    if not fixed:
        assert misfits == []
        return
    (misfit,) = misfits
    assert misfit.error and BATCHING_MISFIT in misfit.message
    assert misfit.message.endswith("fixed: " + ", ".join(fixed))
    without = policy.model_copy(update={"batching": None})
    assert [m for m in policy_misfits(without, signature) if m.loc == ("batching",)] == []
