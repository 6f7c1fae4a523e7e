"""The producer: a Python client and the ``genimg`` CLI (thin wiring over ``genimg``).

``from producer import Client`` is the Python API (see :mod:`producer.client`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Client", "Job", "JobStatus"]


def __getattr__(name: str) -> Any:  # lazy: ``genimg --help`` need not import Celery and boto3
    if name == "Client":
        from producer.client import Client

        return Client
    if name in ("Job", "JobStatus"):
        from producer import job

        return getattr(job, name)
    raise AttributeError(name)
