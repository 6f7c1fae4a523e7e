"""Consume only when able to work: a worker takes shards only while Triton serves every model it needs.

Two parts:

* :class:`TritonWatch` (worker main process) runs ``python -m workers.gate``
  as a subprocess that asks Triton every ``GENIMG_TRITON_CHECK_INTERVAL_S``
  seconds whether each model of :func:`workers.app.required_models` is ready
  (one repository-index request per check, whatever the number of models)
  and prints one JSON line per check. A checker silent for
  :attr:`TritonWatch.silent_s` (stuck in a call, or stopped) is killed and
  started again. The check runs in its own process
  because a gRPC channel in the Celery main process would be inherited by
  every pool child forked later (gRPC is not fork-safe); the subprocess is
  started with fork+exec, so it shares nothing.
* :class:`TritonGate`, a bootstep of Celery's consumer, reads the latest
  check from the consumer's event loop and stops consuming the task queue
  (``cancel_task_queue``) when Triton is unreachable or a model is not ready,
  and starts again (``add_task_queue``) once every model is ready. At start
  the queue is closed until the first good check, so a worker started before
  Triton is ready takes nothing. Shards already taken (running, or waiting on
  a retry countdown) are not failed: they retry within their time budget
  (``GENIMG_RETRY_BUDGET_S``); what stays in the queue waits for a worker that
  can run it. A queue cancelled by remote control (``genimg-prestop`` before
  SIGTERM) stays cancelled: the gate does not open it again. While closed it
  logs why every ``PAUSED_LOG_S`` seconds
  (or 10 check intervals, if shorter).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from celery import bootsteps

log = logging.getLogger(__name__)

STALE_CHECKS = 3
"""A check older than this many intervals (plus the probe's timeout) counts as "not ready"."""

SILENT_MIN_S = 10.0
"""A checker that printed nothing for ``max(SILENT_MIN_S, 2 * stale_s)`` seconds (counted from its start, or
its last answer) is killed and started again: its process or gRPC call is stuck, and a stuck checker would keep
the gate closed for good."""

PAUSED_LOG_S = 30.0
"""While the gate keeps the queue closed, it says why this often (seconds; at most every 10 check intervals)."""


class TritonWatch:
    """The checking subprocess and the latest answer it gave (thread-safe).

    Args:
        url: Triton's ``host:port``.
        protocol: ``grpc`` or ``http``.
        models: the models that must all be ready.
        interval_s: seconds between two checks.
    """

    def __init__(self, url: str, protocol: str, models: Sequence[str], interval_s: float) -> None:
        self.url, self.protocol, self.models, self.interval_s = url, protocol, list(models), interval_s
        self.timeout_s = max(1.0, min(5.0, 2 * interval_s))
        self.stale_s = STALE_CHECKS * interval_s + self.timeout_s
        self.silent_s = max(SILENT_MIN_S, 2 * self.stale_s)
        self._lock = threading.Lock()
        self._ready = False
        self._detail = "no check yet"
        self._at = 0.0
        self._heard = time.monotonic()  # the checker's start or last line, whichever is later
        self._proc: subprocess.Popen | None = None
        self._stopping = False
        self.restarts = 0

    def start(self) -> TritonWatch:
        """Start the subprocess, a thread that reads its answers (and restarts it if it exits), and a
        watchdog that kills it when it goes silent."""
        threading.Thread(target=self._run, name="triton-watch", daemon=True).start()
        threading.Thread(target=self._watchdog, name="triton-watchdog", daemon=True).start()
        return self

    def _spawn(self) -> subprocess.Popen:
        argv = [sys.executable, "-m", "workers.gate", self.url, self.protocol, str(self.interval_s),
                str(self.timeout_s), str(os.getpid()), *self.models]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                close_fds=True)

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._heard = time.monotonic()
                self._proc = proc = self._spawn()
            except OSError as e:
                self._set(False, f"cannot start the Triton check: {e}")
                time.sleep(self.interval_s)  # a retry period before starting the checker again
                continue
            assert proc.stdout is not None
            for line in proc.stdout:
                self._heard = time.monotonic()
                try:
                    doc = json.loads(line)
                    self._set(bool(doc["ready"]), str(doc.get("detail", "")))
                except (ValueError, KeyError, TypeError):
                    continue
            proc.wait()
            if not self._stopping:
                self.restarts += 1
                self._set(False, f"Triton check exited with {proc.returncode}; restarting it")
                time.sleep(self.interval_s)  # a retry period before starting the checker again

    def _watchdog(self) -> None:
        while not self._stopping:
            time.sleep(self.interval_s)  # the watchdog's own period
            proc, silent = self._proc, time.monotonic() - self._heard
            if proc is None or proc.poll() is not None or silent < self.silent_s:
                continue
            log.warning("the Triton check (pid %d) answered nothing for %.0f s: killing it; it starts again",
                        proc.pid, silent)
            self._set(False, f"the Triton check answered nothing for {silent:.0f} s; restarting it")
            proc.kill()  # the reader sees EOF and starts a new checker
            self._heard = time.monotonic()

    def _set(self, ready: bool, detail: str) -> None:
        with self._lock:
            self._ready, self._detail, self._at = ready, detail, time.monotonic()

    def status(self) -> tuple[bool, str]:
        """``(ready, detail)``: ready only if the latest check, recent enough, found every model ready."""
        with self._lock:
            ready, detail, at = self._ready, self._detail, self._at
        if ready and time.monotonic() - at > self.stale_s:
            return False, f"no Triton check answered for {time.monotonic() - at:.0f} s"
        return ready, detail

    def stop(self) -> None:
        """Stop the subprocess."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


class TritonGate(bootsteps.StartStopStep):
    """Consumer bootstep: consume the task queue only while :class:`TritonWatch` says Triton can serve."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c, **kwargs) -> None:
        super().__init__(c, **kwargs)
        self.watch: TritonWatch | None = None
        self.tref = None
        self.open: bool | None = None
        self.released = False
        self.closed_at = self.said_at = 0.0  # when the gate closed; when it last said why

    def start(self, c) -> None:
        from genimg.settings import TritonSettings
        from workers.app import SETTINGS, required_models

        if self.watch is None:
            t = TritonSettings.from_env()
            self.watch = TritonWatch(t.triton_url, t.triton_protocol, required_models(),
                                     SETTINGS.triton_check_interval_s).start()
        self.open = None  # a (re)started consumer consumes what it was told: apply the gate afresh
        self.apply(c)
        self.tref = c.timer.call_repeatedly(min(1.0, SETTINGS.triton_check_interval_s), self.apply, (c,),
                                            priority=10)

    def apply(self, c) -> None:
        """Open or close the task queue to match the latest check (runs in the consumer's event loop)."""
        from workers.app import SETTINGS

        assert self.watch is not None
        if self.released or c.task_consumer is None:
            return
        queue = SETTINGS.queue
        if self.open and not c.task_consumer.consuming_from(queue):
            # Someone else stopped consumption (remote control's cancel_consumer, as genimg-prestop does
            # before SIGTERM): that decision stands; the gate never opens the queue again.
            self.released = True
            log.info("queue %s was cancelled by remote control: the Triton gate leaves it closed", queue)
            return
        ready, detail = self.watch.status()
        if ready == self.open:
            now = time.monotonic()
            if not ready and now - self.said_at >= min(PAUSED_LOG_S, 10 * self.watch.interval_s):
                self.said_at = now
                log.warning("still not taking shards from queue %s (paused for %.0f s): %s", queue,
                            now - self.closed_at, detail)
            return
        queues = c.app.amqp.queues
        if ready:
            if queue in queues:
                queues.select_add(queues[queue])
            c.add_task_queue(queue)
            log.info("Triton ready (%s): consuming shards from queue %s", detail, queue)
        else:
            c.cancel_task_queue(queue)
            self.closed_at = self.said_at = time.monotonic()
            log.warning("Triton cannot serve (%s): not taking shards from queue %s until it can; shards "
                        "already taken retry", detail, queue)
        self.open = ready

    def stop(self, c) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def shutdown(self, c) -> None:
        self.stop(c)
        if self.watch is not None:
            self.watch.stop()


def _check_loop(url: str, protocol: str, interval_s: float, timeout_s: float, parent: int,
                models: list[str]) -> None:
    """The subprocess: print ``{"ready": bool, "detail": str}`` every ``interval_s`` until the parent is gone."""
    from genimg.errors import GenImgError
    from genimg.triton.client import InferenceClient

    client: InferenceClient | None = None
    while os.getppid() == parent:
        t0 = time.monotonic()
        try:
            if client is None:  # a fresh channel after a failure: no inherited reconnect backoff
                client = InferenceClient(url, protocol, timeout_s=timeout_s)
            pending = client.not_ready(models)  # one request, whatever the number of models
            ready = not pending
            detail = f"models {models} ready" if ready else f"not ready: {pending}"
        except GenImgError as e:
            ready, detail = False, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        if not ready and client is not None:
            client.close()
            client = None
        try:
            print(json.dumps({"ready": ready, "detail": detail}), flush=True)
        except BrokenPipeError:
            return
        time.sleep(max(0.0, interval_s - (time.monotonic() - t0)))  # the check period


if __name__ == "__main__":
    _url, _protocol, _interval, _timeout, _parent, *_models = sys.argv[1:]
    try:
        _check_loop(_url, _protocol, float(_interval), float(_timeout), int(_parent), _models)
    except KeyboardInterrupt:
        pass
