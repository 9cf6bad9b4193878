"""The bare comparison endpoint: FastAPI + onnxruntime and nothing else (no safety nets).

    MODEL_PATH=path/to/model.onnx uvicorn loadtests.bare_app:app --port 8090   (default: credit-risk v1)

Parses the v2 body into pydantic models, builds the feeds (each tensor reshaped to its declared
shape, numbers as the model input's dtype), runs the session, answers every output as JSON. It is
what a team would write by hand for any model; `loadtests.bench` compares the gateway with it in
the same run.
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
NUMPY = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
         "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(string)": object}
DATATYPES = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32", "bool": "BOOL",
             "object": "BYTES"}
kinds = {i.name: NUMPY[i.type] for i in session.get_inputs()}
output_names = [o.name for o in session.get_outputs()]
app = FastAPI()


@app.post("/v2/models/{name}/infer")
def infer(name: str, request: InferRequest) -> dict[str, Any]:
    """session.run on the request's tensors, every output answered as JSON."""
    feeds = {t.name: np.array(t.data, dtype=kinds[t.name]).reshape(t.shape) for t in request.inputs}
    results = session.run(None, feeds)
    return {"model_name": name, "id": request.id, "outputs": [
        {"name": output, "shape": list(value.shape), "datatype": DATATYPES[str(value.dtype)],
         "data": value.ravel().tolist()} for output, value in zip(output_names, results, strict=True)]}
