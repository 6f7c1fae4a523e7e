"""A speed probe: what a fixed piece of genimg-like work costs in CPU time while a run is going on.

On a shared host the CPUs' speed drifts, by a factor of up to 2 within seconds and by tens of percent from
minute to minute (run 7: the upper bound made 97.7, 135.8 and 139.0 images/s in three rounds of the same
work, with others using 4-9 % of the CPUs as the guest sees them; the host's steal is not reported to the
guest, so a slow moment shows up as more CPU time for the same work). The probe runs in the bench process
during every measured run: every ``interval_s`` it does one unit of fixed work and records the unit's
``time.thread_time()``. A run's *slowness* is the median unit cost; ``_report`` multiplies each run's
images/s by its slowness (relative to the bench's median) for ``ratios_speed_corrected``. The targets are
judged on the raw medians; the corrected ratios say how much of a round-to-round swing was the host.

The unit: the txt2img upscaler (``upscaler.onnx``, ONNX Runtime, one intra-op thread, a fixed uint8 batch
of 1 x 28 x 28 x 1) and zlib level 6 of a fixed 16 KiB buffer; the upscaler is 55-75 % of every txt2img
system's CPU and zlib (PNG) most of the rest. A unit cost 12-15 ms of CPU on run 8's machine, so at one unit
per 0.5 s the probe takes ~3 % of one CPU, the same for every system. Its CPU time is the bench process's,
which no system counts.
"""

from __future__ import annotations

import statistics
import threading
import time
import zlib
from pathlib import Path

import numpy as np


class SpeedProbe:
    """Samples the CPU cost of a fixed unit of work in a background thread (see the module docstring).

    Use as a context manager around one run; :attr:`costs_ms` then holds each unit's CPU milliseconds.

    Args:
        onnx_dir: genimg's ONNX files (``upscaler.onnx``).
        interval_s: seconds between the starts of two units.
    """

    def __init__(self, onnx_dir: Path, interval_s: float = 0.5) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(Path(onnx_dir) / "upscaler.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        self.feed = {self.session.get_inputs()[0].name: rng.integers(0, 256, (1, 28, 28, 1), dtype=np.uint8)}
        self.buf = rng.integers(0, 16, 16 * 1024, dtype=np.uint8).tobytes()
        self.interval_s = interval_s
        self.costs_ms: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for _ in range(3):  # ONNX Runtime's arena and the caches warm before the first sample
            self.unit_ms()

    def unit_ms(self) -> float:
        """CPU milliseconds (this thread's) of one unit of work."""
        t = time.thread_time()
        self.session.run(None, self.feed)
        zlib.compress(self.buf, 6)
        return 1000 * (time.thread_time() - t)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.costs_ms.append(self.unit_ms())

    def __enter__(self) -> SpeedProbe:
        self.costs_ms = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="speed-probe", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def report(self) -> dict:
        """``{"unit_cpu_ms": median, "unit_cpu_ms_p10", "unit_cpu_ms_p90", "samples"}`` (``{}`` without samples)."""
        c = sorted(self.costs_ms)
        if not c:
            return {}
        return {"unit_cpu_ms": round(statistics.median(c), 3), "unit_cpu_ms_p10": round(c[len(c) // 10], 3),
                "unit_cpu_ms_p90": round(c[(9 * len(c)) // 10], 3), "samples": len(c)}
