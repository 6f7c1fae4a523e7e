"""A speed probe: what a fixed piece of genimg-like work costs in CPU time while a run is going on.

On a shared host the CPUs' speed drifts, by a factor of up to 2 within seconds and by tens of percent from
minute to minute (run 7: the upper bound made 97.7, 135.8 and 139.0 images/s in three rounds of the same
work, with others using 4-9 % of the CPUs as the guest sees them; the host's steal is not reported to the
guest, so a slow moment shows up as more CPU time for the same work). The probe runs in the bench process
during every measured run: after each unit it waits ``interval_s``, then does one unit of fixed work and
records the time and the unit's ``time.thread_time()``. :func:`summary` reduces the samples inside the run's
clock window to their harmonic mean (the run's images/s is an average of a rate proportional to 1 / cost, so
the cost that stands for the window is 1 / mean(1 / cost)); ``_report`` multiplies each run's images/s by it
for ``ratios_speed_corrected``, which cancels between systems measured at the same host speed. That assumes
every system slows down in proportion to the probe; in run 8 a fit of log(images/s) on log(cost) gave
exponents 0.79-0.93, so the correction is a diagnostic, and the targets are judged on the raw medians.

The unit: the txt2img upscaler (``upscaler.onnx``, ONNX Runtime, one intra-op thread, a fixed uint8 batch
of 1 x 28 x 28 x 1) and zlib level 6 of a fixed 16 KiB buffer: the upscaler is most of the per-prompt
systems' model CPU and zlib (PNG) most of their worker's; the per-image systems spend as much again in the
text encoder, which the unit does not run. A unit cost 7.6-15.8 ms of CPU on run 8's machine (p10-p90), so
the probe took 1.5-3 % of one CPU, on the same CPUs as the system under test (the bench process is pinned
with everything else); ``measure`` takes its CPU out of the others' share.
"""

from __future__ import annotations

import statistics
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from benchmarks._infra import start_periodic, stop_periodic

MIN_SAMPLES = 10
"""A window with fewer samples has no summary (its cost would rest on a second or two of a drifting host)."""


class SpeedProbe:
    """Samples the CPU cost of a fixed unit of work in a background thread (see the module docstring).

    Use as a context manager around one run; :attr:`samples` then holds ``(epoch seconds at the unit's end,
    CPU milliseconds)`` per unit, and :attr:`error` the exception that stopped the thread, if one did.

    Args:
        onnx_dir: genimg's ONNX files (``upscaler.onnx``).
        interval_s: seconds to wait after each unit before the next.
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
        self.samples: list[tuple[float, float]] = []
        self.error: str | None = None
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

    def _tick(self) -> None:
        try:
            cost = self.unit_ms()
        except Exception as e:  # recorded: the run's speed becomes "not measured", never a biased figure
            self.error = f"{type(e).__name__}: {e}"
            self._stop.set()
            return
        self.samples.append((time.time(), cost))

    def __enter__(self) -> SpeedProbe:
        self.samples, self.error = [], None
        self._stop.clear()
        self._thread = start_periodic(self._stop, self.interval_s, self._tick, "speed-probe")
        return self

    def __exit__(self, *exc: object) -> None:
        stop_periodic(self._stop, self._thread)

    def cpu_s(self) -> float:
        """CPU seconds the probe's units used in the last run (to take out of the others' share)."""
        return sum(c for _, c in self.samples) / 1000

    def summary(self, t0: float | None = None, t1: float | None = None) -> dict:
        """The samples whose unit ended inside ``[t0, t1]`` (epoch seconds; ``None``: unbounded).

        Returns:
            ``{"unit_cpu_ms": harmonic mean, "unit_cpu_ms_p10", "unit_cpu_ms_median", "unit_cpu_ms_p90",
            "samples"}``; ``{"error": ...}`` if the probe failed; ``{"samples": n}`` alone (no cost) with
            fewer than :data:`MIN_SAMPLES` samples.
        """
        if self.error:
            return {"error": self.error}
        c = sorted(cost for t, cost in self.samples
                   if (t0 is None or t >= t0) and (t1 is None or t <= t1) and cost > 0)
        if len(c) < MIN_SAMPLES:
            return {"samples": len(c)}
        return {"unit_cpu_ms": round(statistics.harmonic_mean(c), 3), "unit_cpu_ms_p10": round(c[len(c) // 10], 3),
                "unit_cpu_ms_median": round(statistics.median(c), 3),
                "unit_cpu_ms_p90": round(c[(9 * len(c)) // 10], 3), "samples": len(c)}
