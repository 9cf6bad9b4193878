"""Build the bundled `credit-risk` example: data set, two ONNX model versions and their cards.

Deterministic from one seed: running it twice with the pinned dev dependencies yields the same
data files, the same ONNX bytes and the same cards. Dev-only (scikit-learn, skl2onnx, pandas):

    python models/build_credit_risk.py            # writes into models/credit-risk/
    python models/build_credit_risk.py --out DIR  # writes DIR/credit-risk/ instead

What it writes:
- data/applications.csv   every synthetic application, with `split` (train / heldout) by date
- data/heldout.csv        the held-out rows (the latest applications: a time-based split)
- data/golden.jsonl       golden examples per version: inputs and the outputs the ONNX file gives
- 1/model.onnx, 1/model.yaml   logistic regression
- 2/model.onnx, 2/model.yaml   gradient boosting
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

SEED = 20261121
ROWS = 12_000
HELDOUT_SHARE = 0.2
MODEL_NAME = "credit-risk"
REFERENCE_BINS = 10
GOLDEN_PER_VERSION = 12

NUMERIC_FEATURES = [
    "age",
    "income",
    "loan_amount",
    "loan_term_months",
    "credit_history_years",
    "num_open_accounts",
    "debt_to_income",
    "delinquencies_2y",
    "has_cosigner",
]
CATEGORICAL_FEATURES = ["employment", "home_ownership", "purpose"]
FEATURES = NUMERIC_FEATURES + CATEGORICAL_FEATURES
EMPLOYMENT = ["salaried", "self_employed", "unemployed", "retired", "student"]
HOME_OWNERSHIP = ["rent", "own", "mortgage", "other"]
PURPOSE = ["debt_consolidation", "car", "home_improvement", "education", "medical", "business", "other"]


def make_applications(rng: np.random.Generator, rows: int) -> pd.DataFrame:
    """Synthesise plausible consumer-loan applications with a default outcome."""
    day0 = np.datetime64("2023-01-01")
    days = np.sort(rng.integers(0, 913, size=rows))  # 2023-01-01 .. 2025-07-01
    dates = (day0 + days.astype("timedelta64[D]")).astype(str)
    gender = rng.choice(["female", "male"], size=rows, p=[0.48, 0.52])
    age = np.clip(np.round(rng.gamma(6.0, 6.5, size=rows) + 18), 18, 85).astype(int)

    employment = np.where(
        age < 25,
        rng.choice(EMPLOYMENT, size=rows, p=[0.45, 0.05, 0.12, 0.0, 0.38]),
        np.where(
            age >= 63,
            rng.choice(EMPLOYMENT, size=rows, p=[0.2, 0.1, 0.05, 0.65, 0.0]),
            rng.choice(EMPLOYMENT, size=rows, p=[0.7, 0.17, 0.09, 0.02, 0.02]),
        ),
    )
    base_income = {"salaried": 52_000, "self_employed": 58_000, "unemployed": 9_000,
                   "retired": 28_000, "student": 11_000}
    income = np.array([base_income[e] for e in employment]) * rng.lognormal(0.0, 0.45, size=rows)
    income *= np.where(gender == "female", 0.93, 1.0)  # a pay gap, so fairness checks have work
    income *= 1.0 + np.clip(age - 25, 0, 30) * 0.012
    income = np.round(income, -1)

    home_ownership = np.where(
        age < 30,
        rng.choice(HOME_OWNERSHIP, size=rows, p=[0.72, 0.05, 0.13, 0.10]),
        rng.choice(HOME_OWNERSHIP, size=rows, p=[0.32, 0.22, 0.42, 0.04]),
    )
    purpose = rng.choice(PURPOSE, size=rows, p=[0.34, 0.2, 0.14, 0.08, 0.07, 0.09, 0.08])
    loan_amount = np.round(np.clip(income * rng.lognormal(-1.4, 0.6, size=rows), 500, 250_000), -1)
    loan_term_months = rng.choice([12, 24, 36, 48, 60], size=rows, p=[0.1, 0.2, 0.35, 0.15, 0.2])
    credit_history_years = np.round(np.minimum(age - 18, rng.gamma(2.5, 3.2, size=rows)), 1)
    credit_history_years = np.where(rng.random(rows) < 0.03, np.nan, credit_history_years)
    num_open_accounts = rng.poisson(4.0, size=rows)
    debt_to_income = np.round(np.clip(rng.beta(2.2, 6.0, size=rows) + loan_amount / income / 10, 0, 1.5), 3)
    delinquencies_2y = rng.poisson(0.35, size=rows)
    has_cosigner = (rng.random(rows) < 0.12).astype(int)

    # Risk: mostly monotone effects, an interaction and a slow upward drift over time, so a
    # time-based split scores worse than a random one.
    history = np.nan_to_num(credit_history_years, nan=2.0)
    logit = (
        -2.1
        + 2.6 * (debt_to_income - 0.35)
        + 0.55 * delinquencies_2y
        - 0.45 * np.log(income / 40_000)
        + 0.35 * np.log(loan_amount / 10_000)
        - 0.06 * np.minimum(history, 15)
        + 0.012 * (loan_term_months - 36)
        - 0.6 * has_cosigner
        + np.select([employment == "unemployed", employment == "self_employed", employment == "student"],
                    [0.9, 0.3, 0.4], 0.0)
        + np.select([home_ownership == "rent", home_ownership == "own"], [0.25, -0.3], 0.0)
        + np.select([purpose == "business", purpose == "medical", purpose == "car"], [0.45, 0.3, -0.2], 0.0)
        + 0.9 * ((age < 25) & (debt_to_income > 0.5))
        + 1.1 * (debt_to_income > 0.65)
        + 0.0009 * (age - 45) ** 2
        + 0.7 * ((delinquencies_2y >= 2) & (home_ownership == "rent"))
        + 0.25 * days / 913
        + rng.normal(0.0, 0.35, size=rows)
    )
    default = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(int)
    customer_id = [f"C{n:07d}" for n in rng.permutation(rows) + 1_000_000]

    frame = pd.DataFrame({
        "customer_id": customer_id,
        "application_date": dates,
        "gender": gender,
        "age": age,
        "income": income,
        "loan_amount": loan_amount,
        "loan_term_months": loan_term_months,
        "credit_history_years": credit_history_years,
        "num_open_accounts": num_open_accounts,
        "debt_to_income": debt_to_income,
        "delinquencies_2y": delinquencies_2y,
        "has_cosigner": has_cosigner,
        "employment": employment,
        "home_ownership": home_ownership,
        "purpose": purpose,
        "default": default,
    })
    # Served inputs are float32: keep every numeric value exactly representable in float32 so
    # tree thresholds learnt in float64 split the same rows in ONNX.
    for name in NUMERIC_FEATURES:
        frame[name] = frame[name].astype(np.float32).astype(np.float64)
    cutoff = int(rows * (1 - HELDOUT_SHARE))
    frame["split"] = np.where(np.arange(rows) < cutoff, "train", "heldout")
    return frame


def preprocessor(scale: bool) -> ColumnTransformer:
    """Impute (and for linear models scale) numeric columns; one-hot the categories.

    Unseen categories encode as all-zero. Trees get no scaler: a float32 scaler in ONNX against a
    float64 one in scikit-learn would move values across split thresholds.
    """
    steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="median"))]
    if scale:
        steps.append(("scale", StandardScaler()))
    numeric = Pipeline(steps)
    categorical = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
    return ColumnTransformer(
        [("numeric", numeric, NUMERIC_FEATURES), ("categorical", categorical, CATEGORICAL_FEATURES)]
    )


def candidate_models() -> dict[str, tuple[str, Pipeline]]:
    """The example versions: version -> (description, unfitted pipeline)."""
    return {
        "1": ("logistic regression", Pipeline([
            ("prep", preprocessor(scale=True)),
            ("clf", LogisticRegression(C=0.5, max_iter=500)),
        ])),
        "2": ("gradient boosting", Pipeline([
            ("prep", preprocessor(scale=False)),
            ("clf", GradientBoostingClassifier(n_estimators=120, max_depth=3, learning_rate=0.08,
                                               subsample=0.9, random_state=SEED)),
        ])),
    }


def to_onnx_bytes(pipeline: Pipeline) -> bytes:
    """Convert a fitted pipeline to ONNX with one named [N, 1] input per feature."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    initial_types = [(name, FloatTensorType([None, 1])) for name in NUMERIC_FEATURES]
    initial_types += [(name, StringTensorType([None, 1])) for name in CATEGORICAL_FEATURES]
    model = convert_sklearn(
        pipeline,
        initial_types=initial_types,
        options={id(pipeline.steps[-1][1]): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    model.doc_string = ""
    # skl2onnx names the graph with a random uuid and lists opsets in set order: pin both.
    model.graph.name = "credit_risk"
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    del model.opset_import[:]
    for domain, version in opsets:
        model.opset_import.add(domain=domain, version=version)
    return model.SerializeToString()


def onnx_feeds(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Feed dict for the ONNX model from a frame of applications."""
    feeds: dict[str, np.ndarray] = {}
    for name in NUMERIC_FEATURES:
        feeds[name] = frame[name].to_numpy(dtype=np.float32).reshape(-1, 1)
    for name in CATEGORICAL_FEATURES:
        feeds[name] = frame[name].to_numpy(dtype=object).reshape(-1, 1)
    return feeds


def signature_of(session: Any) -> dict[str, list[dict[str, Any]]]:
    """Model signature in protocol terms, read from an onnxruntime session."""
    dtypes = {"tensor(float)": "FP32", "tensor(string)": "BYTES", "tensor(int64)": "INT64",
              "tensor(double)": "FP64", "tensor(bool)": "BOOL", "tensor(int32)": "INT32"}

    def describe(args: Any) -> list[dict[str, Any]]:
        return [{"name": a.name, "datatype": dtypes[a.type],
                 "shape": [d if isinstance(d, int) else -1 for d in a.shape]} for a in args]

    return {"inputs": describe(session.get_inputs()), "outputs": describe(session.get_outputs())}


def reference_profile(train: pd.DataFrame, scores: np.ndarray) -> dict[str, Any]:
    """Per-feature quantile bins (numeric) or category frequencies, and the score distribution."""
    features: dict[str, Any] = {}
    for name in NUMERIC_FEATURES:
        values = train[name].to_numpy(dtype=float)
        present = values[~np.isnan(values)]
        features[name] = {"kind": "numeric", **quantile_histogram(present),
                          "missing_rate": round(float(np.isnan(values).mean()), 6),
                          "min": float(present.min()), "max": float(present.max())}
    for name in CATEGORICAL_FEATURES:
        counts = train[name].value_counts(normalize=True).sort_index()
        features[name] = {"kind": "categorical",
                          "frequencies": {str(k): round(float(v), 6) for k, v in counts.items()},
                          "missing_rate": 0.0}
    return {
        "rows": len(train),
        "features": features,
        "prediction": {"output": "probabilities", "index": 1, **quantile_histogram(scores)},
    }


def quantile_histogram(values: np.ndarray) -> dict[str, list[float]]:
    """Inner bin edges at the deciles (deduplicated) and the share of values in each bin.

    Bins are (-inf, e0], (e0, e1], ..., (e_last, inf): len(frequencies) == len(bin_edges) + 1.
    """
    edges = np.unique(np.quantile(values, np.linspace(0, 1, REFERENCE_BINS + 1)[1:-1]))
    index = np.searchsorted(edges, values, side="left")
    frequencies = np.bincount(index, minlength=len(edges) + 1) / len(values)
    return {"bin_edges": [round(float(e), 6) for e in edges],
            "frequencies": [round(float(f), 6) for f in frequencies]}


def json_value(value: Any) -> Any:
    """A JSON-friendly scalar (NaN becomes null, numpy scalars become Python numbers)."""
    if isinstance(value, (float, np.floating)) and np.isnan(value):
        return None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def golden_examples(frame: pd.DataFrame, session: Any) -> list[dict[str, Any]]:
    """Inputs and the exact outputs of the ONNX file, for rows chosen to cover the feature space."""
    picks = [
        frame.sort_values("debt_to_income").iloc[[0, -1]],
        frame[frame["credit_history_years"].isna()].iloc[:2],
        frame[frame["employment"] == "unemployed"].iloc[:1],
        frame[frame["employment"] == "student"].iloc[:1],
        frame[frame["delinquencies_2y"] >= 3].iloc[:1],
        frame[frame["has_cosigner"] == 1].iloc[:1],
        frame.sort_values("income").iloc[[0, -1]],
        frame.iloc[:2],
    ]
    rows = pd.concat(picks).iloc[:GOLDEN_PER_VERSION]
    label, probabilities = session.run(None, onnx_feeds(rows))
    examples = []
    for i, (_, row) in enumerate(rows.iterrows()):
        examples.append({
            "id": f"golden-{i:02d}-{row['customer_id']}",
            "inputs": {name: json_value(row[name]) for name in FEATURES},
            "outputs": {"label": int(label[i]),
                        "probabilities": [round(float(p), 7) for p in probabilities[i]]},
            "expected": {"label": int(row["default"])},
        })
    return examples


def metrics(y: np.ndarray, probability: np.ndarray) -> dict[str, float]:
    """Held-out quality of a binary classifier."""
    return {
        "auc": round(float(roc_auc_score(y, probability)), 4),
        "accuracy": round(float(accuracy_score(y, probability >= 0.5)), 4),
        "brier": round(float(brier_score_loss(y, probability)), 4),
        "log_loss": round(float(log_loss(y, probability)), 4),
        "positive_rate": round(float((probability >= 0.5).mean()), 4),
    }


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def build(out: Path) -> None:
    """Write the data set, both versions and their cards under out/credit-risk/."""
    import onnxruntime as ort

    root = out / MODEL_NAME
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    frame = make_applications(np.random.default_rng(SEED), ROWS)
    csv = frame.to_csv(index=False, float_format="%.6g", lineterminator="\n").encode()
    (data_dir / "applications.csv").write_bytes(csv)
    heldout = frame[frame["split"] == "heldout"].reset_index(drop=True)
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    (data_dir / "heldout.csv").write_bytes(
        heldout.to_csv(index=False, float_format="%.6g", lineterminator="\n").encode())
    train_csv = train.to_csv(index=False, float_format="%.6g", lineterminator="\n").encode()

    golden_lines: list[str] = []
    for version, (description, pipeline) in candidate_models().items():
        pipeline.fit(train[FEATURES], train["default"])
        onnx_bytes = to_onnx_bytes(pipeline)
        version_dir = root / version
        version_dir.mkdir(parents=True, exist_ok=True)
        (version_dir / "model.onnx").write_bytes(onnx_bytes)

        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        _, onnx_proba = session.run(None, onnx_feeds(heldout))
        sk_proba = pipeline.predict_proba(heldout[FEATURES])
        gap = float(np.abs(onnx_proba - sk_proba).max())
        if gap > 1e-4:
            sys.exit(f"version {version}: ONNX and scikit-learn disagree by {gap:.2e}")
        _, train_proba = session.run(None, onnx_feeds(train))
        golden = golden_examples(heldout, session)
        golden_lines += [json.dumps({"version": version, **g}, sort_keys=True) for g in golden]

        card = {
            "name": MODEL_NAME,
            "version": version,
            "description": f"Probability that a consumer-loan applicant defaults within 12 months "
                           f"({description}).",
            "owner": "risk-ml@example.com",
            "intended_use": "Rank consumer-loan applications by default risk to support a human credit "
                            "officer's decision; not for automated declines without review.",
            "limitations": [
                "Trained on synthetic data: figures show the gateway's checks, not a real credit market.",
                "Applicants younger than 21 or older than 80 are rare in the training data.",
                "The outcome drifts upward over time; retrain at least every six months.",
                "Not calibrated for loans above 250,000 or terms above 60 months.",
            ],
            "platform": "onnxruntime_onnx",
            "sha256": sha256_bytes(onnx_bytes),
            "signature": signature_of(session),
            "score": {"output": "probabilities", "index": 1, "positive_label": 1},
            "training_data": {
                "description": "Synthetic consumer-loan applications (build_credit_risk.py, "
                               f"seed {SEED}); training rows are the earliest "
                               f"{int((1 - HELDOUT_SHARE) * 100)} % by application_date.",
                "sha256": sha256_bytes(train_csv),
                "rows": len(train),
                "date_range": [str(train["application_date"].min()), str(train["application_date"].max())],
                "protected_attributes": ["gender"],
                "label": "default",
            },
            "metrics": {
                "heldout": {
                    "split": "time",
                    "rows": len(heldout),
                    "date_range": [str(heldout["application_date"].min()),
                                   str(heldout["application_date"].max())],
                    **metrics(heldout["default"].to_numpy(), onnx_proba[:, 1]),
                },
            },
            "reference_profile": reference_profile(train, train_proba[:, 1]),
            "golden": golden,
        }
        (version_dir / "model.yaml").write_text(
            "# Generated by models/build_credit_risk.py; do not edit by hand.\n"
            + yaml.safe_dump(card, sort_keys=False, width=100, allow_unicode=True)
        )
    (data_dir / "golden.jsonl").write_text("\n".join(golden_lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="model repository root to write into (default: models/)")
    build(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
