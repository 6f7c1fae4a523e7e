"""Fixtures of the container checks (``make deploy-check``): podman, the images, Redis and S3 on loopback.

The checks in this directory that run containers skip unless ``GENIMG_DEPLOY_CHECK=1``
(``scripts/deploy-check.sh`` sets it after ``make images``), so ``make test`` stays offline.
Facts worth printing (items, images/s, sizes, exit codes, what kube play ignored) go into
:data:`REPORT`; they are printed after the run and written to ``demo-out/deploy-check.json``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.redisserver import RedisServer
from tests.fixtures.s3 import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, start_moto_server, stop_process

ROOT = Path(__file__).resolve().parents[2]
TAG = os.environ.get("GENIMG_IMAGE_TAG", "dev")
IMAGES = {"worker": f"localhost/genimg/worker:{TAG}", "triton": f"localhost/genimg/triton-cpu:{TAG}"}
"""Local image per manifest image name (``genimg-worker``, ``genimg-triton``): what `make images` tags."""
ENABLED = os.environ.get("GENIMG_DEPLOY_CHECK") == "1"
SKIP_REASON = "runs containers: `make deploy-check` (GENIMG_DEPLOY_CHECK=1, after `make images`)"
BUCKET = "genimg"
HOST_PORTS = (8000, 8001, 8002, 9101, 9180)
"""Triton HTTP/gRPC/metrics, worker and exporter metrics: the manifests' ports, taken on the host network."""
REPORT: dict[str, Any] = {}


def podman(*args: str, timeout: float = 120, check: bool = True, stdin: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS`` (with this project's CONTAINERS_CONF); raise on failure if ``check``."""
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False,
                         input=stdin, env={**os.environ, "CONTAINERS_CONF": containers_conf()})
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... exited {out.returncode}: {out.stderr[-3000:]}")
    return out


LOG_DIR = ROOT / "demo-out" / "deploy-check-logs"


def save_logs(*names: str) -> None:
    """Keep each container's output in demo-out/deploy-check-logs/NAME.log (before it is removed)."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    for name in names:
        out = podman("logs", name, check=False)
        if out.returncode == 0:
            (LOG_DIR / f"{name}.log").write_text(out.stdout + out.stderr)


def containers_conf() -> str:
    if not os.environ.get("CONTAINERS_CONF"):
        out = subprocess.run(["bash", str(ROOT / "scripts" / "ensure-podman.sh")], capture_output=True, text=True,
                             timeout=600, check=True)
        os.environ["CONTAINERS_CONF"] = out.stdout.strip()
    return os.environ["CONTAINERS_CONF"]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@dataclass
class Services:
    """Redis and moto's S3 server on loopback, and the credentials the pods get."""

    redis_url: str
    s3_endpoint: str

    @property
    def secrets(self) -> dict[str, dict[str, str]]:
        """The two Secrets deploy/k8s/secrets/ describes, with these services' values."""
        return {"genimg-redis": {"url": self.redis_url},
                "genimg-s3": {"credentials": f"[default]\naws_access_key_id = {TEST_ACCESS_KEY_ID}\n"
                                             f"aws_secret_access_key = {TEST_SECRET_ACCESS_KEY}\n"}}

    @property
    def overrides(self) -> dict[str, str]:
        """The only settings changed from the manifests: where S3 is (cpu-dev names a MinIO service)."""
        return {"GENIMG_S3_ENDPOINT_URL": self.s3_endpoint}


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    if not ENABLED:
        pytest.skip(SKIP_REASON)
    # An earlier run killed mid-way (CI timeout, kill -9) can leave its own containers holding the ports.
    leftovers = podman("ps", "-a", "--filter", "name=^genimg-check-", "--format", "{{.Names}}", check=False)
    if leftovers.returncode == 0 and leftovers.stdout.split():
        podman("rm", "-f", "-t", "0", *leftovers.stdout.split(), check=False)
    busy = [p for p in HOST_PORTS if not port_free(p)]
    assert not busy, f"ports {busy} are taken on 127.0.0.1; the containers use the manifests' ports"
    for image in IMAGES.values():
        assert podman("image", "exists", image, check=False).returncode == 0, f"no image {image}: run make images"
    tmp = tmp_path_factory.mktemp("services")
    redis = RedisServer(tmp / "redis", appendonly=False).start()
    moto = start_moto_server(tmp)
    env = {"GENIMG_REDIS_URL": redis.url, "GENIMG_S3_ENDPOINT_URL": moto.endpoint_url,
           "GENIMG_S3_ACCESS_KEY_ID": TEST_ACCESS_KEY_ID, "GENIMG_S3_SECRET_ACCESS_KEY": TEST_SECRET_ACCESS_KEY,
           "GENIMG_S3_ADDRESSING_STYLE": "path", "GENIMG_QUEUE": "genimg", "GENIMG_KEY_PREFIX": "genimg"}
    with pytest.MonkeyPatch.context() as mp:  # the producer (this process) talks to the same services
        for key in [k for k in os.environ if k.startswith("GENIMG_") and k not in ("GENIMG_DEPLOY_CHECK",
                                                                                   "GENIMG_IMAGE_TAG")]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        from genimg.settings import StorageSettings
        from genimg.stores.s3 import S3Store

        store = S3Store(StorageSettings.from_env(), BUCKET)
        store.ensure_bucket()
        store.close()
        try:
            yield Services(redis.url, moto.endpoint_url)
        finally:
            redis.stop()
            stop_process(moto.process)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORT:
        return
    terminalreporter.section("deploy-check")
    for key, value in REPORT.items():
        if isinstance(value, dict):
            terminalreporter.write_line(f"{key}:")
            for k, v in value.items():
                terminalreporter.write_line(f"    {k}: {v}")
        else:
            terminalreporter.write_line(f"{key}: {value}")
    out = ROOT / "demo-out" / "deploy-check.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(REPORT, indent=2, default=str) + "\n")
    terminalreporter.write_line(f"(also in {out.relative_to(ROOT)})")
