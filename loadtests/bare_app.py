"""The bare comparison endpoint: FastAPI + onnxruntime and nothing else (no safety nets).

    uvicorn loadtests.bare_app:app --port 8090     (MODEL_PATH env: defaults to credit-risk v1)

Parses the v2 body into pydantic models, builds the feeds, runs the session, answers JSON. It is
what a team would write by hand; the benchmark compares the gateway with it in the same run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path(os.environ.get("MODEL_PATH", ROOT / "models" / "credit-risk" / "1" / "model.onnx"))


class Tensor(BaseModel):
    """One v2 input tensor."""

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferRequest(BaseModel):
    """The v2 request body."""

    id: str | None = None
    inputs: list[Tensor]


options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
session = ort.InferenceSession(str(MODEL), sess_options=options, providers=["CPUExecutionProvider"])
kinds = {i.name: (object if i.type == "tensor(string)" else np.float32) for i in session.get_inputs()}
app = FastAPI()


@app.post("/v2/models/{name}/infer")
def infer(name: str, request: InferRequest) -> dict[str, Any]:
    """session.run on the request's tensors, answered as JSON."""
    feeds = {t.name: np.array(t.data, dtype=kinds[t.name]).reshape(-1, 1) for t in request.inputs}
    label, probabilities = session.run(None, feeds)
    return {"model_name": name, "id": request.id, "outputs": [
        {"name": "label", "shape": list(label.shape), "datatype": "INT64", "data": label.tolist()},
        {"name": "probabilities", "shape": list(probabilities.shape), "datatype": "FP32",
         "data": probabilities.ravel().tolist()}]}
