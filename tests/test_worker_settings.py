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
