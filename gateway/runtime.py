"""ONNX Runtime sessions: create with bounded threads, read the signature, run off the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from gateway.card import Signature, TensorSpec
from gateway.errors import InferenceFailed, InferenceTimeout
from gateway.tensors import ONNX_TO_DATATYPE


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are created: onnxruntime thread counts per session."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1


class RunControl:
    """Cancels one run: onnxruntime stops at its next node, and injected delays wake up."""

    def __init__(self) -> None:
        self.options = ort.RunOptions()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the run to stop (safe from any thread)."""
        self.options.terminate = True
        self.cancelled.set()


#: runs in the worker thread just before the session; may sleep (waking on cancel) or raise
BeforeRun = Callable[[RunControl], None]


class UnsupportedModel(Exception):
    """The ONNX file uses a type the protocol cannot carry (e.g. sequence or map outputs)."""


class OnnxModel:
    """One loaded ONNX file: its session and signature. `run` is blocking; `predict` is async."""

    def __init__(self, model_bytes: bytes, options: RuntimeOptions) -> None:
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.log_severity_level = 3
        self.session = ort.InferenceSession(
            model_bytes, sess_options=session_options, providers=["CPUExecutionProvider"]
        )
        self.signature = Signature(
            inputs=[_tensor_spec(a) for a in self.session.get_inputs()],
            outputs=[_tensor_spec(a) for a in self.session.get_outputs()],
        )
        self.output_names = [o.name for o in self.signature.outputs]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
            control: RunControl | None = None, before_run: BeforeRun | None = None) -> dict[str, np.ndarray]:
        """Run the session synchronously; runtime errors (and cancellation) become InferenceFailed."""
        names = list(outputs) if outputs else self.output_names
        control = control or RunControl()
        if before_run is not None:
            before_run(control)
        if control.cancelled.is_set():
            raise InferenceFailed("run cancelled before it started (deadline passed while queued)")
        try:
            results = self.session.run(names, dict(feeds), control.options)
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise InferenceFailed(f"onnxruntime failed: {exc}") from exc
        return {name: _canonical(result) for name, result in zip(names, results, strict=True)}

    async def predict(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None,
                      executor: ThreadPoolExecutor, deadline: float | None = None,
                      before_run: BeforeRun | None = None) -> dict[str, np.ndarray]:
        """Run on the bounded worker pool; at the deadline (loop time) answer InferenceTimeout at once.

        The abandoned run is cancelled so its worker is freed: onnxruntime checks the terminate
        flag between nodes, and a run still queued never starts.
        """
        loop = asyncio.get_running_loop()
        control = RunControl()
        future = loop.run_in_executor(executor, self.run, feeds, outputs, control, before_run)
        try:
            if deadline is None:
                return await asyncio.shield(future)
            done, _ = await asyncio.wait({future}, timeout=max(deadline - loop.time(), 0.0))
            if done:
                return future.result()
            raise InferenceTimeout("deadline passed before the model answered; the run was cancelled")
        except BaseException:  # timed out, or the caller was cancelled (the client went away)
            if not future.done():
                control.cancel()
                future.add_done_callback(_forget)
            raise


def _forget(future: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned run's outcome so asyncio does not warn that nobody did."""
    if not future.cancelled():
        future.exception()


def _canonical(array: np.ndarray) -> np.ndarray:
    # onnxruntime hands back int64 as numpy's `longlong` type code, which serialisers such as
    # orjson do not recognise; view it as the canonical int64 (same bytes, no copy).
    if array.dtype.kind in "iu" and array.dtype.char not in "bBhHiIlL":
        return array.view(np.dtype(f"{array.dtype.kind}{array.dtype.itemsize}"))
    return array


def _tensor_spec(arg: Any) -> TensorSpec:
    datatype = ONNX_TO_DATATYPE.get(arg.type)
    if datatype is None:
        raise UnsupportedModel(f"{arg.name!r} has type {arg.type}, which the protocol cannot carry")
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)
