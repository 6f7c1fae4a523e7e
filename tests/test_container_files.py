"""The container files as container tools read them, offline (issue 17).

- Every Dockerfile builds without a registry: no ``# syntax=`` line (BuildKit would fetch that
  frontend) and no BuildKit-only flags (Docker's legacy builder rejects ``COPY --chmod``).
- The triton-cpu image copies the whole cpu model repository, so new models need no change.
- ``podman-compose config`` (a real compose implementation, from PyPI in the test extra; with
  ``--dry-run`` it needs no podman) resolves the compose file; a broken copy must fail.

Building and running the images is ``make deploy-check`` (tests/containers/).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_deploy import DEPLOY, DOCKERFILES, ROOT, compose_file, dockerfile_stages


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_without_a_registry_frontend_or_buildkit_only_flags(dockerfile):
    """Docker's legacy builder, BuildKit, podman and buildah must all build it offline (issue 17)."""
    text = dockerfile.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), "a `# syntax=` line makes BuildKit pull a frontend"
    for kw, rest in [i for stage in dockerfile_stages(dockerfile) for i in stage]:
        if kw in ("COPY", "ADD"):
            assert not re.search(r"--(chmod|link|parents|exclude)\b", rest), f"BuildKit-only flag: {kw} {rest}"
        if kw == "RUN":
            assert not rest.startswith("--") and "<<" not in rest, f"BuildKit-only RUN form: {rest[:60]}"


def test_triton_cpu_image_copies_the_whole_cpu_repository_whatever_models_it_holds():
    final = dockerfile_stages(DEPLOY / "docker" / "triton-cpu.Dockerfile")[-1]
    args = dict(rest.split("=", 1) for kw, rest in final if kw == "ARG" and "=" in rest)
    copies = [rest.split() for kw, rest in final if kw == "COPY" and "--from" not in rest]
    assert copies == [["${MODEL_REPOSITORY}", "/models/repository"]], "one COPY of the whole repository directory"
    assert args["MODEL_REPOSITORY"] == ".cache/genimg/model_repository"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert f"!{args['MODEL_REPOSITORY']}/" in ignore, ".dockerignore must let the repository into the context"
    makefile = (ROOT / "Makefile").read_text()
    assert "models build-repo --flavor cpu --out $(REPO)" in makefile.split("\nimages:", 1)[1].split("\n\n", 1)[0]


def _podman_compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    """``podman-compose --dry-run -f PATH config`` (podman-compose from PyPI, the test extra; --dry-run: no podman needed)."""
    exe = Path(sys.executable).parent / "podman-compose"
    assert exe.exists(), "podman-compose is missing: pip install -e '.[test]'"
    env = {k: v for k, v in os.environ.items() if k not in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
                                                             "GRAFANA_ADMIN_PASSWORD")}
    return subprocess.run([str(exe), "--dry-run", "-f", str(path), "config"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env, check=False)


def test_podman_compose_config_resolves_the_compose_file_as_written(tmp_path):
    out = _podman_compose_config(DEPLOY / "docker-compose.yml")
    assert out.returncode == 0, out.stderr[-2000:]
    resolved = yaml.safe_load(out.stdout)
    services = resolved["services"]
    assert set(services) == set(compose_file()["services"])
    worker = services["worker"]
    assert worker["environment"]["GENIMG_TRITON_URL"] == "triton:8001", "the x-genimg-env anchor merged"
    assert worker["environment"]["GENIMG_S3_ACCESS_KEY_ID"] == "genimg", "${MINIO_ROOT_USER:-genimg} interpolated"
    assert worker["read_only"] is True and worker["stop_grace_period"] == "300s"
    for name in ("worker", "triton", "exporter"):
        build = services[name]["build"]
        assert (Path(build["context"]) / build["dockerfile"]).is_file(), f"{name}: {build}"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((DEPLOY / "docker-compose.yml").read_text().replace("<<: *genimg-env", "<<: *no-such-anchor"))
    assert _podman_compose_config(broken).returncode != 0, "podman-compose accepted an undefined YAML alias"
