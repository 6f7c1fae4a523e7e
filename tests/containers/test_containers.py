"""The images, run as the cpu-dev overlay's worker pod would run them: a real job through real containers.

``podman run`` on the host network, one container per manifest container, with what
tests/containers/kube.py takes from the rendered manifests: env and Secrets, command and args,
user, read-only root, no privilege escalation, no capabilities, emptyDirs as tmpfs, limits and
the grace period. Redis and moto's S3 server run on loopback (conftest.py). Order matters (one
stack for the module): images, a broken setting, the job, probes, metrics, then shutdown.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import urllib.request

import pytest

from genimg.imaging import decode
from genimg.shards import committed_shards, read_shard_index
from genimg.verify import verify_manifest
from genimg.stores.base import sha256_hex
from producer import Client
from tests.containers import kube
from tests.containers.conftest import ENABLED, IMAGES, REPORT, ROOT, SKIP_REASON, BUCKET, podman, save_logs
from tests.fixtures.prometheus import scrape
from tests.fixtures.workers import wait_for
from tests.test_deploy import rendered

pytestmark = pytest.mark.skipif(not ENABLED, reason=SKIP_REASON)

PROMPTS = [f"a handwritten {d}" for d in range(10)] + [f"the number {w}" for w in ("one", "two", "three", "four",
                                                                                    "five", "six")]
IMAGES_PER_PROMPT = 64
SHARD_SIZE = 128
"""16 prompts x 64 = 1,024 items in 8 shards of 128: several seconds of work on 2 cores."""
BAD_PROTOCOL = "carrier-pigeon"


@pytest.fixture(scope="module")
def objs() -> list[dict]:
    return rendered("cpu-dev")


@pytest.fixture(scope="module")
def worker_pod(objs):
    return kube.pod_spec(kube.find(objs, "Deployment", "genimg-worker"))


def http_port(c: dict, probe: str) -> tuple[int, str]:
    """Port number and path of an httpGet probe (a named port resolved)."""
    get = c[probe]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    return ports.get(get["port"], get["port"]), get["path"]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def _container_args(objs, spec, name, services, tmp, extra_env=None):
    c = kube.container(spec, name)
    env = kube.container_env(c, objs, services.secrets, pod_name="genimg-worker-check",
                             overrides={**services.overrides, **(extra_env or {})})
    return kube.run_args(spec, c, env, IMAGES[name], name=f"genimg-check-{name}", secret_dir=tmp / name,
                         secrets=services.secrets)


@pytest.fixture(scope="module")
def stack(objs, worker_pod, services, tmp_path_factory):
    """Triton, then (after its startup probe passes, as the kubelet does) the worker; removed at the end."""
    tmp = tmp_path_factory.mktemp("pod")
    names = ["genimg-check-triton", "genimg-check-worker"]
    podman("rm", "-f", *names, check=False)
    try:  # removed even when start-up fails, so a failed run leaves no container holding the ports
        triton = kube.container(worker_pod, "triton")
        podman("run", "-d", *_container_args(objs, worker_pod, "triton", services, tmp))
        port, path = http_port(triton, "startupProbe")
        probe = triton["startupProbe"]
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}{path}") or _exited("genimg-check-triton"),
                 probe["periodSeconds"] * probe["failureThreshold"], "Triton's startup probe")
        assert not _exited("genimg-check-triton"), podman("logs", "genimg-check-triton").stderr[-3000:]
        podman("run", "-d", *_container_args(objs, worker_pod, "worker", services, tmp))
        worker = kube.container(worker_pod, "worker")
        ready = worker["readinessProbe"]["exec"]["command"]
        wait_for(lambda: podman("exec", "genimg-check-worker", *ready, check=False).returncode == 0
                 or _exited("genimg-check-worker"), 120, "the worker's readiness probe")
        assert not _exited("genimg-check-worker"), podman("logs", "genimg-check-worker").stderr[-3000:]
        yield {"triton": triton, "worker": worker}
    finally:
        save_logs(*names)
        podman("rm", "-f", "-t", "5", *names, check=False)


def _exited(name: str) -> bool:
    out = podman("inspect", "--format", "{{.State.Status}}", name, check=False)
    return out.returncode != 0 or out.stdout.strip() in ("exited", "stopped")


def _inspect(name: str) -> dict:
    return json.loads(podman("inspect", name).stdout)[0]


def test_images_run_as_non_root_the_worker_has_no_torch_and_triton_carries_the_whole_repository():
    sizes = {}
    for name, image in IMAGES.items():
        info = json.loads(podman("image", "inspect", image).stdout)[0]
        assert info["Config"]["User"] == "10001:10001", f"{image} runs as {info['Config']['User']!r}"
        sizes[image] = f"{info['Size'] / 1e6:.0f} MB"
    REPORT["image sizes"] = sizes
    probe = "import importlib.util as u; print(sorted(m for m in ('torch', 'onnxruntime', 'pytriton') if u.find_spec(m)))"
    out = podman("run", "--rm", "--network", "none", "--entrypoint", "python", IMAGES["worker"], "-c", probe)
    assert out.stdout.strip() == "[]", f"the worker image carries {out.stdout}"
    host = json.loads((ROOT / ".cache/genimg/model_repository/genimg_repository.json").read_text())
    out = podman("run", "--rm", "--network", "none", "--entrypoint", "cat", IMAGES["triton"],
                 "/models/repository/genimg_repository.json")
    assert json.loads(out.stdout) == host, "triton-cpu's repository is not the one build-repo wrote here"


def test_an_invalid_worker_setting_makes_the_container_exit_2_at_start(objs, worker_pod, services, tmp_path):
    args = _container_args(objs, worker_pod, "worker", services, tmp_path,
                           extra_env={"GENIMG_TRITON_PROTOCOL": BAD_PROTOCOL})
    args[args.index("--name") + 1] = "genimg-check-broken"
    t0 = time.monotonic()
    try:
        out = podman("run", "--rm", *args, timeout=90, check=False)
    finally:  # a worker that did start would otherwise stay behind
        podman("rm", "-f", "-t", "0", "genimg-check-broken", check=False)
    REPORT["exit code, GENIMG_TRITON_PROTOCOL=" + BAD_PROTOCOL] = out.returncode
    assert out.returncode == 2, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert "GENIMG_TRITON_PROTOCOL" in out.stderr
    assert time.monotonic() - t0 < 60


def test_a_job_submitted_from_the_host_lands_every_item_once_with_its_sha256(stack):
    n = len(PROMPTS) * IMAGES_PER_PROMPT
    with Client() as client:
        t0 = time.monotonic()
        job = client.submit(PROMPTS, images_per_prompt=IMAGES_PER_PROMPT, output=f"s3://{BUCKET}/deploy-check",
                            seed=17, shard_size=SHARD_SIZE)
        status = job.wait(progress=False, timeout_s=600)
        elapsed = time.monotonic() - t0
        assert status.state == "succeeded", status
        store, layout = client.job_store(job.spec)
        manifest = job.manifest()
        shards = committed_shards(store, layout)
        raw = [i for s in shards for i in read_shard_index(store, layout, s).column("item_index").to_pylist()]
        assert shards == list(range(job.spec.shard_plan().num_shards))
        assert sorted(raw) == list(range(n)), "an item is missing or was committed twice"
        assert manifest.num_rows == n and set(manifest.column("status").to_pylist()) == {"ok"}
        report = verify_manifest(store, layout, manifest, ranged=False)
        assert report.ok and report.checked == n, report.problems[:5]
        first = manifest.slice(0, 1).to_pylist()[0]
        with tarfile.open(fileobj=io.BytesIO(store.get_bytes(first["tar_key"]))) as tf:
            image = tf.extractfile(f"{first['key']}.{first['format']}").read()
        assert sha256_hex(image) == first["sha256"]
        h, w, _ = decode(image).shape
    sizes = manifest.column("tar_size").to_pylist()
    REPORT["job"] = {"items": n, "shards": len(shards), "seconds": round(elapsed, 1),
                     "images/s": round(n / elapsed, 1), "image": f"{w}x{h} {first['format']}",
                     "image bytes (mean)": round(sum(sizes) / n)}
    stack["items"], stack["shards"] = n, len(shards)


def test_the_worker_check_and_every_probe_pass_inside_the_running_pod(stack):
    for probe in ("readinessProbe", "livenessProbe"):
        out = podman("exec", "genimg-check-worker", *stack["worker"][probe]["exec"]["command"], check=False)
        assert out.returncode == 0 and "worker check ok" in out.stdout, out.stderr
    out = podman("exec", "genimg-check-worker", "genimg", "worker", "--check", check=False)
    assert out.returncode == 0, out.stderr
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port, path = http_port(stack["triton"], probe)
        assert http_ok(f"http://127.0.0.1:{port}{path}"), f"Triton's {probe} {path} fails"
    port, _ = http_port(stack["triton"], "readinessProbe")
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        index = {m["name"]: m.get("state") for m in json.loads(r.read())}
    host = {p.parent.name for p in (ROOT / ".cache/genimg/model_repository").glob("*/config.pbtxt")}
    assert index == dict.fromkeys(host, "READY"), f"served {index}, the cpu repository has {sorted(host)}"
    REPORT["triton-cpu serves (READY)"] = len(index)


def test_worker_and_triton_metrics_count_the_job(stack, objs):
    env = kube.find(objs, "ConfigMap", "genimg-worker-env")["data"]
    worker = scrape(f"http://127.0.0.1:{env['GENIMG_METRICS_PORT']}/metrics")
    written = sum(s.value for s in worker["genimg_images_written_total"])
    committed = sum(s.value for s in worker["genimg_shards_committed_total"])
    assert (written, committed) == (stack["items"], stack["shards"])
    triton_port = {p["name"]: p["containerPort"] for p in stack["triton"]["ports"]}["triton-metrics"]
    triton = scrape(f"http://127.0.0.1:{triton_port}/metrics")
    ok = {s.labels["model"]: s.value for s in triton["nv_inference_request_success_total"]}
    assert ok.get("txt2img", 0) > 0, ok
    REPORT["metrics"] = {"genimg_images_written_total": written, "genimg_shards_committed_total": committed,
                         "nv_inference_request_success{model=txt2img}": ok["txt2img"]}


def test_stopping_the_pod_is_a_warm_shutdown_with_exit_0_within_the_grace_period(stack, worker_pod):
    grace = worker_pod["terminationGracePeriodSeconds"]
    pre = stack["worker"]["lifecycle"]["preStop"]["exec"]["command"]
    out = podman("exec", "-e", "POD_NAME=genimg-worker-check", "genimg-check-worker", *pre, timeout=60, check=False)
    assert out.returncode == 0 and "stopped consuming" in out.stdout, (out.stdout, out.stderr)
    exits = {}
    for name in ("worker", "triton"):  # the kubelet stops the sidecar only after the worker has exited
        t0 = time.monotonic()
        podman("stop", "-t", str(grace), f"genimg-check-{name}", timeout=grace + 30)
        seconds = time.monotonic() - t0
        state = _inspect(f"genimg-check-{name}")["State"]
        exits[name] = {"exit code": state["ExitCode"], "seconds to stop": round(seconds, 1)}
        assert state["ExitCode"] == 0 and seconds < grace, (name, state)
    out = podman("logs", "genimg-check-worker")
    assert "warm shutdown" in (out.stdout + out.stderr).lower(), out.stdout[-2000:]  # Celery's banner line
    REPORT["shutdown (podman stop -t %d)" % grace] = exits
