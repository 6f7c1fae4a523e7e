"""Shared pytest configuration: fixtures live in tests/fixtures/, one module per real server."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = [
    "tests.fixtures.paths",
    "tests.fixtures.triton",
    "tests.fixtures.s3",
    "tests.fixtures.faultproxy",
    "tests.fixtures.workers",
    "tests.fixtures.producer",
    "tests.fixtures.redisserver",
]
