"""Server-side batching of concurrent predict requests, as TF Serving's `--enable_batching`.

Requests that arrive while the model is busy (or within `batch_timeout_s` of each other) and that can
share one signature call are merged: `serving_default` requests whose layouts have the same size (their
id arrays are concatenated), and any `synthesize_png` requests (their PNG lists are concatenated; the
signature decodes each PNG on its own). One worker thread runs the merged batch and hands each request
its slice of the outputs. A merged call that fails (e.g. one request's corrupt PNG) is retried request
by request, so one bad request never fails the others.

numpy and the standard library only; the model call is the backend's `run(request) -> outputs`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable

import numpy as np

from crn_tf.studio import rest


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """How requests are merged.

    Attributes:
        max_batch_size: most layouts in one merged call (a larger single request still runs alone).
        batch_timeout_s: how long the first request of a batch waits for others to join it.
    """

    max_batch_size: int = 8
    batch_timeout_s: float = 0.002


@dataclasses.dataclass
class _Job:
    request: rest.PredictRequest
    future: concurrent.futures.Future
    size: int  # layouts


def _key(request: rest.PredictRequest) -> tuple:
    """Requests with equal keys can share one call: same signature, and for ids the same layout size."""
    if rest.LABEL_IDS in request.inputs:
        return (request.signature_name, request.inputs[rest.LABEL_IDS].shape[1:])
    return (request.signature_name,)


class Batcher:
    """Merges concurrent requests into batched calls of `run` on one worker thread.

    batcher = Batcher(backend.run, BatchingOptions(max_batch_size=8))
    outputs = batcher.run(request)   # from any thread: blocks until its batch has run

    Attributes:
        calls: model calls made so far; `layouts` : layouts they ran (for tests and benchmarks).
    """

    def __init__(self, run: Callable[[rest.PredictRequest], dict[str, np.ndarray]], options: BatchingOptions):
        if options.max_batch_size < 1 or options.batch_timeout_s < 0:
            raise ValueError(f"batching: max_batch_size must be >= 1 and batch_timeout_s >= 0, got {options}")
        self._run_model = run
        self.options = options
        self._queue: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.calls = 0
        self.layouts = 0
        self._thread = threading.Thread(target=self._work, name="crn-studio-batcher", daemon=True)
        self._thread.start()

    def run(self, request: rest.PredictRequest) -> dict[str, np.ndarray]:
        """The request's outputs, computed in a batch with whatever requests arrived with it.

        Raises:
            What the model call raised for this request (alone).
        """
        job = _Job(request, concurrent.futures.Future(), len(next(iter(request.inputs.values()))))
        with self._cv:
            if self._closed:
                raise RuntimeError("crn-studio: the batcher is closed")
            self._queue.append(job)
            self._cv.notify()
        return job.future.result()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _take_batch(self) -> list[_Job] | None:
        """The oldest job and those that can join it, waiting up to batch_timeout_s for more."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            batch, size, key = [first], first.size, _key(first.request)
            deadline = time.monotonic() + self.options.batch_timeout_s
            while size < self.options.max_batch_size:
                joiners = [j for j in self._queue if _key(j.request) == key]
                for job in joiners:
                    if size + job.size > self.options.max_batch_size:
                        break
                    self._queue.remove(job)
                    batch.append(job)
                    size += job.size
                remaining = deadline - time.monotonic()
                if size >= self.options.max_batch_size or remaining <= 0:
                    break
                self._cv.wait(remaining)
            return batch

    def _work(self) -> None:
        while (batch := self._take_batch()) is not None:
            if len(batch) == 1:
                self._run_alone(batch[0])
                continue
            try:
                outputs = self._call(_merge([job.request for job in batch]))
            except Exception:  # noqa: BLE001 - one request's bad input: run each alone, each gets its own answer
                for job in batch:
                    self._run_alone(job)
                continue
            start = 0
            for job in batch:
                job.future.set_result({k: v[start : start + job.size] for k, v in outputs.items()})
                start += job.size

    def _run_alone(self, job: _Job) -> None:
        try:
            job.future.set_result(self._call(job.request))
        except BaseException as e:  # noqa: BLE001 - delivered to the waiting request
            job.future.set_exception(e)

    def _call(self, request: rest.PredictRequest) -> dict[str, np.ndarray]:
        outputs = self._run_model(request)
        self.calls += 1
        self.layouts += len(next(iter(request.inputs.values())))
        return outputs


def _merge(requests: list[rest.PredictRequest]) -> rest.PredictRequest:
    """One request holding the layouts of `requests` (equal keys), in order."""
    name = next(iter(requests[0].inputs))
    batch = np.concatenate([r.inputs[name] for r in requests])
    return rest.PredictRequest(requests[0].signature_name, {name: batch}, requests[0].row_format)
