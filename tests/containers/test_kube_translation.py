"""Offline: how tests/containers/kube.py turns the rendered manifests into podman options (no podman needed)."""

from __future__ import annotations

import json

import pytest

from tests.containers import kube
from tests.test_deploy import rendered

SECRETS = {"genimg-redis": {"url": "redis://127.0.0.1:6390/0"},
           "genimg-s3": {"credentials": "[default]\naws_access_key_id = a\naws_secret_access_key = b\n"}}


@pytest.mark.parametrize("text, env, want", [
    ("genimg@$(POD_NAME)", {"POD_NAME": "p-0"}, "genimg@p-0"),
    ("$(A)-$(B)", {"A": "1"}, "1-$(B)"),  # unknown variables stay as written
    ("$$(A)", {"A": "1"}, "$(A)"),  # $$ escapes
])
def test_expand_follows_kubernetes_var_expansion(text, env, want):
    assert kube.expand(text, env) == want


def test_quantities_convert_to_bytes_and_cpus():
    assert [kube.quantity_bytes(q) for q in ("2Gi", "64Mi", "512M", "1000")] == [2 * 1024**3, 64 * 1024**2,
                                                                              512 * 1000**2, 1000]
    assert [kube.quantity_cpus(q) for q in ("2", "500m")] == [2.0, 0.5]


def test_the_worker_container_runs_with_the_manifests_env_command_and_security(tmp_path):
    objs = rendered("cpu-dev")
    spec = kube.pod_spec(kube.find(objs, "Deployment", "genimg-worker"))
    c = kube.container(spec, "worker")
    env = kube.container_env(c, objs, SECRETS, "genimg-worker-x", {"GENIMG_S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert env["GENIMG_REDIS_URL"] == "redis://127.0.0.1:6390/0" and env["POD_NAME"] == "genimg-worker-x"
    assert env["GENIMG_TRITON_PROTOCOL"] == "grpc" and env["GENIMG_S3_ENDPOINT_URL"] == "http://127.0.0.1:9"
    args = kube.run_args(spec, c, env, "img:1", name="w", secret_dir=tmp_path, secrets=SECRETS)
    image_at = args.index("img:1")
    assert args[image_at + 1:] == ["worker", "--hostname", "genimg@genimg-worker-x"]
    assert json.loads(args[args.index("--entrypoint") + 1]) == ["genimg"]
    opts = " ".join(args[:image_at])
    for want in ("--network host", "--user 10001:10001", "--read-only", "--security-opt no-new-privileges",
                 "--cap-drop ALL", "--stop-timeout 300", "--memory 2147483648", "--shm-size 1073741824"):
        assert want in opts, want
    assert "--tmpfs /tmp:" in opts and "--tmpfs /var/run/genimg:" in opts
    assert (tmp_path / "s3-credentials" / "credentials").read_text() == SECRETS["genimg-s3"]["credentials"]
    assert (tmp_path / "s3-credentials" / "credentials").stat().st_mode & 0o777 == 0o440


def test_kube_play_rewrites_only_what_podman_cannot_take_and_names_each_change():
    objs = rendered("cpu-dev")
    images = {"worker": "localhost/genimg/worker:t", "triton-cpu": "localhost/genimg/triton-cpu:t"}
    docs, changes, volumes = kube.for_kube_play(objs, ["genimg-worker", "genimg-exporter"], images,
                                                {"GENIMG_S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "Deployment"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["data"]["GENIMG_S3_ENDPOINT_URL"] == "http://127.0.0.1:9"
    worker = kube.pod_spec(kube.find(docs, "Deployment", "genimg-worker"))
    assert "initContainers" not in worker and [c["name"] for c in worker["containers"]] == ["triton", "worker"]
    for c in worker["containers"]:
        assert "ports" not in c and c["image"] in images.values()
        assert not any("$(" in w for w in c.get("command", []) + c.get("args", [])), c["name"]
    assert kube.container(worker, "triton")["startupProbe"]["httpGet"]["port"] == 8000
    names = [v["name"] for v in volumes]
    assert len(names) == len(set(names)) and all(v["uid"] == 10001 for v in volumes)
    assert {c.field.split()[0] for c in changes} >= {"initContainers[].restartPolicy:", "containers[].ports",
                                                      "volumes[].emptyDir", "Secret"}
    uses = kube.secret_uses(docs)
    assert uses == {"genimg-redis": {"env"}, "genimg-s3": {"volume"}}
    assert json.loads(kube.podman_secret("genimg-redis", SECRETS["genimg-redis"], {"env"})) == {
        "url": "cmVkaXM6Ly8xMjcuMC4wLjE6NjM5MC8w"}
    with pytest.raises(ValueError):
        kube.podman_secret("x", {"k": "v"}, {"env", "volume"})
