"""The rendered cpu-dev overlay's worker pod (worker + Triton) and exporter under ``podman kube play``.

There is no Kubernetes API server to install here (no kube-apiserver, k3s, kind or minikube in
any reachable registry), so podman's kube play is the real runtime that reads the manifests:
their env (ConfigMap, Secrets, fieldRef), commands, exec probes, security contexts and limits.
What podman 4.3 cannot take as written is rewritten first, each change with its reason
(:func:`tests.containers.kube.for_kube_play`), and what it silently ignores is found by comparing
``podman inspect`` with the manifest (:func:`tests.containers.kube.applied`). Both lists are
printed. A small job then runs through the played pod.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from genimg.verify import verify_manifest
from producer import Client
from tests.containers import kube
from tests.containers.conftest import BUCKET, ENABLED, IMAGES, REPORT, SKIP_REASON, podman, save_logs
from tests.containers.test_containers import http_ok
from tests.fixtures.prometheus import scrape
from tests.fixtures.workers import wait_for
from tests.test_deploy import rendered

pytestmark = pytest.mark.skipif(not ENABLED, reason=SKIP_REASON)

DEPLOYMENTS = ["genimg-worker", "genimg-exporter"]
WORKER_POD = "genimg-worker-pod-0"
"""podman names a Deployment's pod ``<name>-pod-0`` and its containers ``<pod>-<container>``."""
MUST_APPLY = ("securityContext.runAsUser/runAsGroup", "securityContext.readOnlyRootFilesystem",
              "securityContext.allowPrivilegeEscalation: false", "securityContext.capabilities.drop: [ALL]",
              "env (value, configMapKeyRef, secretKeyRef, fieldRef)")


@pytest.fixture(scope="module")
def objs() -> list[dict]:
    return rendered("cpu-dev")


@pytest.fixture(scope="module")
def played(objs, services, tmp_path_factory):
    images = {"worker": IMAGES["worker"], "triton-cpu": IMAGES["triton"]}
    docs, changes, volumes = kube.for_kube_play(objs, DEPLOYMENTS, images, services.overrides)
    path = tmp_path_factory.mktemp("kube") / "genimg-cpu-dev.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    for name in [f"{d}-pod-0" for d in DEPLOYMENTS]:
        podman("pod", "rm", "-f", "-t", "0", name, check=False)
    for name, uses in kube.secret_uses(docs).items():
        podman("secret", "rm", name, check=False)
        podman("volume", "rm", "-f", name, check=False)  # podman keeps a secret volume under the secret's name
        podman("secret", "create", name, "-", stdin=kube.podman_secret(name, services.secrets[name], uses))
    for v in volumes:
        podman("volume", "rm", "-f", v["name"], check=False)
        podman("volume", "create", "--opt", "type=tmpfs", "--opt", "device=tmpfs",
               "--opt", f"o=uid={v['uid']},gid={v['gid']}", v["name"])
    out = podman("kube", "play", str(path), timeout=300, check=False)
    try:
        assert out.returncode == 0, out.stderr[-3000:]
        triton = kube.container(kube.pod_spec(kube.find(docs, "Deployment", "genimg-worker")), "triton")
        probe = triton["startupProbe"]
        url = f"http://127.0.0.1:{probe['httpGet']['port']}{probe['httpGet']['path']}"
        wait_for(lambda: http_ok(url), probe["periodSeconds"] * probe["failureThreshold"], "Triton in the played pod")
        REPORT["kube play changes (what podman 4.3 could not take as written)"] = {c.field: c.why for c in changes}
        yield {"docs": docs, "path": path}
    finally:
        save_logs(f"{WORKER_POD}-triton", f"{WORKER_POD}-worker", "genimg-exporter-pod-0-exporter")
        for name in [f"{d}-pod-0" for d in DEPLOYMENTS]:
            podman("pod", "rm", "-f", "-t", "5", name, check=False)
        for name in services.secrets:
            podman("secret", "rm", name, check=False)
            podman("volume", "rm", "-f", name, check=False)
        for v in volumes:
            podman("volume", "rm", "-f", v["name"], check=False)


def test_kube_play_applies_the_security_context_env_and_command_and_says_what_it_ignores(played):
    ignored, hc = {}, {}
    for doc in played["docs"]:
        if doc["kind"] != "Deployment":
            continue
        spec = kube.pod_spec(doc)
        pod = f"{doc['metadata']['name']}-pod-0"
        for c in spec["containers"]:
            info = json.loads(podman("inspect", f"{pod}-{c['name']}").stdout)[0]
            fields = kube.applied(spec, c, info)
            missing = [f for f in MUST_APPLY if f in fields and not fields[f]]
            assert not missing, f"{pod}-{c['name']}: podman did not apply {missing}"
            ignored[c["name"]] = sorted(f for f, ok in fields.items() if not ok)
            if (info["Config"].get("Healthcheck") or {}).get("Test"):
                run = podman("healthcheck", "run", f"{pod}-{c['name']}", timeout=60, check=False)
                hc[c["name"]] = f"{' '.join(info['Config']['Healthcheck']['Test'][1:])!r} -> " \
                                f"{(run.stdout.strip() or run.stderr.strip())[:60] or 'healthy'}"
    spec = kube.pod_spec(kube.find(played["docs"], "Deployment", "genimg-worker"))
    (vol,) = [v for v in spec["volumes"] if "secret" in v]
    (mount,) = [m for m in kube.container(spec, "worker")["volumeMounts"] if m["name"] == vol["name"]]
    path = f"{mount['mountPath']}/{vol['secret']['items'][0]['path']}"
    mode = podman("exec", f"{WORKER_POD}-worker", "stat", "-c", "%a", path).stdout.strip()
    if int(mode, 8) != vol["secret"]["defaultMode"]:
        ignored["worker"].append(f"volumes[].secret.defaultMode (0{vol['secret']['defaultMode']:o}; podman wrote 0{mode})")
    env = dict(e.split("=", 1) for e in json.loads(podman("inspect", f"{WORKER_POD}-worker").stdout)[0]["Config"]["Env"])
    assert env["POD_NAME"] == WORKER_POD and env["GENIMG_REDIS_URL"].startswith("redis://127.0.0.1:")
    REPORT["kube play ignored (manifest fields podman inspect does not show in effect)"] = ignored
    REPORT["kube play health checks (liveness probes; podman healthcheck run)"] = hc
    assert hc["worker"].endswith("healthy"), hc


def test_the_played_pod_runs_a_job_and_the_played_exporter_serves_the_backlog(played):
    with Client() as client:
        t0 = time.monotonic()
        job = client.submit(count=256, output=f"s3://{BUCKET}/kube-play", seed=3, shard_size=64)
        status = job.wait(progress=False, timeout_s=300)
        assert status.state == "succeeded", status
        store, layout = client.job_store(job.spec)
        manifest = job.manifest()
        report = verify_manifest(store, layout, manifest, ranged=False)
        assert manifest.num_rows == 256 and report.ok and report.checked == 256, report.problems[:5]
    exporter = kube.container(kube.pod_spec(kube.find(played["docs"], "Deployment", "genimg-exporter")), "exporter")
    port = exporter["readinessProbe"]["httpGet"]["port"]
    backlog = {(s.labels["queue"], s.labels["kind"]): s.value
               for s in scrape(f"http://127.0.0.1:{port}/metrics")["genimg_backlog_shards"]}
    assert backlog[("genimg", "total")] == 0, backlog
    REPORT["kube play job"] = {"items": 256, "seconds": round(time.monotonic() - t0, 1),
                               "exporter genimg_backlog_shards{kind=total}": backlog[("genimg", "total")]}


def test_stopping_the_played_pod_stops_the_worker_warm_with_exit_0(played, objs):
    grace = kube.pod_spec(kube.find(objs, "Deployment", "genimg-worker"))["terminationGracePeriodSeconds"]
    t0 = time.monotonic()
    podman("pod", "stop", "-t", str(grace), WORKER_POD, timeout=grace + 30)  # kube play ignores the grace period
    seconds = time.monotonic() - t0
    codes = {c: json.loads(podman("inspect", f"{WORKER_POD}-{c}").stdout)[0]["State"]["ExitCode"]
             for c in ("worker", "triton")}
    REPORT[f"kube play shutdown (podman pod stop -t {grace})"] = {**{f"{c} exit code": v for c, v in codes.items()},
                                                                 "seconds": round(seconds, 1)}
    assert codes == {"worker": 0, "triton": 0} and seconds < grace, codes
