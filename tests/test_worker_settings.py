"""Worker settings that tune throughput are read from ``GENIMG_*`` and bounded."""

from __future__ import annotations

import pydantic
import pytest

from genimg.settings import WorkerSettings


def test_infer_inflight_defaults_to_two_and_is_read_from_genimg_infer_inflight(monkeypatch):
    monkeypatch.delenv("GENIMG_INFER_INFLIGHT", raising=False)
    assert WorkerSettings().infer_inflight == 2
    monkeypatch.setenv("GENIMG_INFER_INFLIGHT", "4")
    assert WorkerSettings().infer_inflight == 4


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_infer_inflight_outside_1_to_64_is_refused(monkeypatch, value):
    monkeypatch.setenv("GENIMG_INFER_INFLIGHT", value)
    with pytest.raises(pydantic.ValidationError, match="infer_inflight"):
        WorkerSettings()


def test_a_first_retry_countdown_above_the_largest_is_refused_naming_both_settings(monkeypatch):
    from genimg.errors import ConfigError
    from genimg.settings import check_timing

    monkeypatch.setenv("GENIMG_RETRY_BACKOFF_MAX_S", "60")
    monkeypatch.setenv("GENIMG_RETRY_BACKOFF_BASE_S", "60")
    check_timing(WorkerSettings())  # equal: the first countdown is already the largest, allowed
    monkeypatch.setenv("GENIMG_RETRY_BACKOFF_BASE_S", "1e6")
    with pytest.raises(ConfigError, match=r"GENIMG_RETRY_BACKOFF_BASE_S \(1e\+06\) must not exceed "
                                          r"GENIMG_RETRY_BACKOFF_MAX_S \(60\)"):
        check_timing(WorkerSettings())

def test_a_worker_that_dies_of_an_unrecoverable_error_exits_non_zero():
    """Celery logs "Unrecoverable error" and stops with exit code 1, which ``app.worker_main`` used to drop, so
    ``genimg worker`` exited 0 and a supervisor checking the code saw a clean stop. Here the pool cannot start:
    200 pool processes need more pipes than a limit of 256 open files allows (a real EMFILE)."""
    import os
    import resource
    import subprocess
    import sys
    from pathlib import Path

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    env = {**os.environ, "GENIMG_CONCURRENCY": "200", "GENIMG_TRITON_URL": "127.0.0.1:1",
           "GENIMG_QUEUE": "genimg-test-unrecoverable", "GENIMG_METRICS_PORT": "0"}
    proc = subprocess.run([sys.executable, "-m", "producer.cli", "worker"], env=env, preexec_fn=few_files,
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert "Unrecoverable error: OSError(24, 'Too many open files')" in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 1, proc.returncode
