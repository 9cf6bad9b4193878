"""ONNX Runtime sessions: create with bounded threads, read the signature, run them.

A run happens either on the worker pool (`predict`: one thread hop, the deadline is awaited) or
inline on the event loop (`InlineRunner`: no hop, for models whose run costs less than the hop;
a watchdog thread terminates a run that overruns its deadline).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from gateway.card import Signature, TensorSpec
from gateway.errors import InferenceFailed, InferenceTimeout, QueuedTooLong
from gateway.tensors import ONNX_TO_DATATYPE


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are created: onnxruntime thread counts per session."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1


_EVENT_LOCK = threading.Lock()


class RunControl:
    """Cancels one run: onnxruntime stops at its next node, and injected delays wake up.

    Made for every run, so it is cheap: the threading.Event that sleepers wait on (a condition and
    a lock, several microseconds) is only created when something actually waits.
    """

    __slots__ = ("_event", "is_cancelled", "options")

    def __init__(self) -> None:
        self.options = ort.RunOptions()
        self.is_cancelled = False
        self._event: threading.Event | None = None

    def cancel(self) -> None:
        """Ask the run to stop (safe from any thread)."""
        self.options.terminate = True
        self.is_cancelled = True
        event = self._event
        if event is not None:
            event.set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds unless cancelled; True when cancelled."""
        if self._event is None:
            with _EVENT_LOCK:
                if self._event is None:
                    self._event = threading.Event()
        if self.is_cancelled:  # checked after publishing the event: a concurrent cancel() sets one or the other
            self._event.set()
        return self._event.wait(timeout)


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
        self.output_datatypes = {o.name: o.datatype for o in self.signature.outputs}
        # The public `InferenceSession.run` re-checks input names and catches provider failures
        # on every call: ~25 us here, more than a small model's run. Inputs are validated before
        # they get here, so call the binding underneath it (pinned onnxruntime; public API if absent).
        binding = getattr(self.session, "_sess", None)
        self._run: Callable[[list[str], Mapping[str, np.ndarray], ort.RunOptions], list[Any]] = (
            binding.run if binding is not None and hasattr(binding, "run") else self.session.run)
        self.run_ms: float | None = None
        """Median single-row run time measured at warm-up (None until measured)."""

    def measure(self, feeds: Mapping[str, np.ndarray], runs: int = 7) -> float:
        """Time `runs` runs of `feeds` and remember the median in `run_ms` (milliseconds)."""
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            self.run(feeds)
            times.append((time.perf_counter() - started) * 1000)
        self.run_ms = statistics.median(times)
        return self.run_ms

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
            control: RunControl | None = None, before_run: BeforeRun | None = None) -> dict[str, np.ndarray]:
        """Run the session synchronously; runtime errors (and cancellation) become InferenceFailed."""
        names = list(outputs) if outputs else self.output_names
        control = control or RunControl()
        if before_run is not None:
            before_run(control)
        if control.is_cancelled:
            raise InferenceFailed("run cancelled before it started (deadline passed while queued)")
        try:
            results = self._run(names, feeds, control.options)
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


class InlineRunner:
    """Runs sessions on the calling (event-loop) thread, under a watchdog that enforces deadlines.

    A thread hop costs far more CPU than a small model's run, so tiny models run inline. The loop
    is blocked while a run lasts, so an overrunning run must still be stopped: a daemon thread
    looks at the current run every `tick_s` and sets onnxruntime's terminate flag once its
    deadline (monotonic clock, the loop's clock) has passed. It reads one attribute per tick
    and takes no lock on the request path.
    """

    def __init__(self, tick_s: float = 0.005) -> None:
        self._tick_s = tick_s
        self._current: tuple[RunControl, float] | None = None
        self._stopped = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.terminated = 0
        """Runs the watchdog stopped at their deadline."""

    def run(self, model: OnnxModel, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None,
            deadline: float | None) -> dict[str, np.ndarray]:
        """Run now, on this thread; InferenceTimeout when the deadline passed before or during the run."""
        if deadline is not None and time.monotonic() >= deadline:
            raise QueuedTooLong("deadline passed before the model could run")
        if self._watchdog is None:
            self._start()
        control = RunControl()
        self._current = (control, deadline if deadline is not None else float("inf"))
        try:
            return model.run(feeds, outputs, control)
        except InferenceFailed:
            if control.is_cancelled:
                raise InferenceTimeout("deadline passed while the model ran inline; the run was terminated") from None
            raise
        finally:
            self._current = None

    def _start(self) -> None:
        self._watchdog = threading.Thread(target=self._watch, name="inline-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        stopped = self._stopped
        while not stopped.wait(self._tick_s):
            current = self._current
            if current is not None and time.monotonic() >= current[1] and not current[0].is_cancelled:
                current[0].cancel()
                self.terminated += 1

    def close(self) -> None:
        """Stop the watchdog thread (the next inline run starts a new one)."""
        watchdog, stopped = self._watchdog, self._stopped
        self._watchdog, self._stopped = None, threading.Event()
        stopped.set()
        if watchdog is not None:
            watchdog.join(timeout=1)


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


#: the process's inline runner: one watchdog thread for every inline version of every model
INLINE = InlineRunner()
