"""From the rendered Kubernetes manifests to podman: how the deploy check runs the pod's containers.

Two ways, both on the host's network (the pod's ``127.0.0.1`` is the host's here):

* :func:`run_args` turns one container of a pod spec into ``podman run`` options the way the
  kubelet would apply them: the env (``envFrom`` ConfigMaps, then ``env``: values,
  ``configMapKeyRef``, ``secretKeyRef``, ``fieldRef: metadata.name``), ``command``/``args`` with
  Kubernetes' ``$(VAR)`` expansion, the security context (user, read-only root, no privilege
  escalation, dropped capabilities), emptyDirs as tmpfs, Secret volumes as read-only files owned
  by the pod's ``fsGroup``, memory and CPU limits, and the grace period as the stop timeout.
* :func:`for_kube_play` rewrites the objects for ``podman kube play`` (podman 4.3) and lists
  every change it had to make and why (:class:`Change`); :func:`applied` then compares a
  container spec with ``podman inspect`` of what podman created, field by field.

Only addresses are overridden (Redis URL, S3 endpoint): the values the manifests leave to the
cluster. Everything else comes from the manifests.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
GiB, MiB = 1024**3, 1024**2
_UNITS = {"Ki": 1024, "Mi": MiB, "Gi": GiB, "Ti": 1024 * GiB, "k": 1000, "M": 1000**2, "G": 1000**3}


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' expansion of ``$(VAR)`` in ``command``/``args``: known variables replaced,
    unknown ones left as written, ``$$`` an escaped ``$``."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(sub, text)


def quantity_bytes(q: str | int) -> int:
    """A Kubernetes memory quantity (``2Gi``, ``64Mi``, ``512M``, ``1000``) in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMG])?", str(q))
    if not m:
        raise ValueError(f"unsupported quantity {q!r}")
    return int(float(m.group(1)) * _UNITS.get(m.group(2) or "", 1))


def quantity_cpus(q: str | int) -> float:
    """A Kubernetes CPU quantity (``2``, ``500m``) in CPUs."""
    s = str(q)
    return int(s[:-1]) / 1000 if s.endswith("m") else float(s)


def find(objs: list[dict], kind: str, name: str) -> dict:
    """The one object of ``kind`` whose name is ``name`` or, for a generated ConfigMap, ``name-<hash>``."""
    found = [o for o in objs if o["kind"] == kind
             and re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?", o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def containers(spec: dict) -> list[dict]:
    """Every container of a pod spec, init and sidecar containers first."""
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(spec: dict, name: str) -> dict:
    (c,) = [c for c in containers(spec) if c["name"] == name]
    return c


def container_env(c: dict, objs: list[dict], secrets: Mapping[str, Mapping[str, str]], pod_name: str,
                  overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The container's environment as the kubelet builds it, then ``overrides`` (addresses only).

    Raises:
        KeyError: a referenced ConfigMap key or Secret key does not exist.
        ValueError: an env source this check does not know.
    """
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(find(objs, "ConfigMap", src["configMapRef"]["name"])["data"])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
            continue
        ref = e["valueFrom"]
        if "configMapKeyRef" in ref:
            env[e["name"]] = find(objs, "ConfigMap", ref["configMapKeyRef"]["name"])["data"][ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            env[e["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        elif ref.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
        else:
            raise ValueError(f"env {e['name']}: unsupported source {ref}")
    env.update(overrides or {})
    return env


def security(spec: dict, c: dict) -> dict[str, Any]:
    """The effective security context: the container's fields over the pod's."""
    return {**spec.get("securityContext", {}), **c.get("securityContext", {})}


def write_secret_volume(vol: dict, secrets: Mapping[str, Mapping[str, str]], dest: Path, gid: int | None) -> Path:
    """Write a Secret volume's items as files under ``dest`` with its ``defaultMode``, group ``gid``."""
    src = vol["secret"]
    data = secrets[src["secretName"]]
    dest.mkdir(parents=True, exist_ok=True)
    items = src.get("items") or [{"key": k, "path": k} for k in data]
    for item in items:
        path = dest / item["path"]
        path.write_text(data[item["key"]])
        path.chmod(item.get("mode", src.get("defaultMode", 0o644)))
        if gid is not None and os.geteuid() == 0:
            os.chown(path, 0, gid)
    return dest


def run_args(spec: dict, c: dict, env: Mapping[str, str], image: str, *, name: str, secret_dir: Path,
             secrets: Mapping[str, Mapping[str, str]]) -> list[str]:
    """``podman run`` options and command line (after ``podman run``) for container ``c`` of pod ``spec``.

    The image's entrypoint is replaced when the container sets ``command``; ``args`` become the
    command (both ``$(VAR)``-expanded with ``env``).
    """
    sc = security(spec, c)
    args = ["--name", name, "--network", "host", "--stop-timeout", str(spec.get("terminationGracePeriodSeconds", 30)),
            "--no-healthcheck"]
    if "runAsUser" in sc:
        args += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
    if sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for cap in sc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    limits = c.get("resources", {}).get("limits", {})
    if "memory" in limits:
        args += ["--memory", str(quantity_bytes(limits["memory"]))]
    if "cpu" in limits:
        args += ["--cpus", str(quantity_cpus(limits["cpu"]))]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        vol = volumes[m["name"]]
        if "emptyDir" in vol:
            if m["mountPath"] == "/dev/shm":
                size = vol["emptyDir"].get("sizeLimit", "64Mi")
                args += ["--shm-size", str(quantity_bytes(size))]
            else:
                size = quantity_bytes(vol["emptyDir"].get("sizeLimit", "1Gi"))
                args += ["--tmpfs", f"{m['mountPath']}:rw,exec,nosuid,nodev,size={size},mode=1777"]
        elif "secret" in vol:
            files = write_secret_volume(vol, secrets, secret_dir / m["name"], spec.get("securityContext", {}).get("fsGroup"))
            args += ["-v", f"{files}:{m['mountPath']}:ro"]
        else:
            raise ValueError(f"volume {m['name']}: unsupported kind {sorted(vol)}")
    for k, v in env.items():
        args += ["-e", f"{k}={v}"]
    words = [expand(w, env) for w in c.get("args", [])]
    if "command" in c:
        command = [expand(w, env) for w in c["command"]]
        args += ["--entrypoint", json.dumps(command[:1])]
        words = command[1:] + words
    return [*args, image, *words]


# ----------------------------------------------------------------------------- podman kube play


@dataclass(frozen=True)
class Change:
    """One rewrite of the rendered objects that podman kube play (4.3) needs, and why."""

    field: str
    why: str


def secret_uses(docs: list[dict]) -> dict[str, set[str]]:
    """Secret name -> how the Deployments in ``docs`` use it: ``"env"`` (secretKeyRef) and/or ``"volume"``."""
    uses: dict[str, set[str]] = {}
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        spec = pod_spec(d)
        for c in containers(spec):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    uses.setdefault(ref["name"], set()).add("env")
        for v in spec.get("volumes", []):
            if "secret" in v:
                uses.setdefault(v["secret"]["secretName"], set()).add("volume")
    return uses


def podman_secret(name: str, data: Mapping[str, str], uses: set[str]) -> str:
    """The bytes to ``podman secret create`` so that podman 4.3's kube play reads Secret ``name`` right.

    podman 4.3 reads a secret two ways: ``secretKeyRef`` wants a JSON object of key -> base64
    value; a ``secret`` volume wants a Secret object and writes its ``data`` values to files
    *without* base64-decoding them (``stringData`` is ignored). A Secret object in the played
    YAML is stored as YAML, which ``secretKeyRef`` cannot parse. So each secret is created in
    the form its one use needs.

    Raises:
        ValueError: the secret is used both ways (no single form serves both in podman 4.3).
    """
    if uses == {"env"}:
        return json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in data.items()})
    if uses == {"volume"}:
        return json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": dict(data)})
    raise ValueError(f"secret {name} is used as {sorted(uses)}; podman 4.3 reads env and volume secrets differently")


def _numeric_probe_ports(c: dict) -> None:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
    for key in ("startupProbe", "readinessProbe", "livenessProbe"):
        for handler in ("httpGet", "tcpSocket"):
            h = c.get(key, {}).get(handler)
            if h and isinstance(h.get("port"), str):
                h["port"] = ports[h["port"]]


def for_kube_play(objs: list[dict], deployments: list[str], images: Mapping[str, str],
                  config_overrides: Mapping[str, str]) -> tuple[list[dict], list[Change], list[dict]]:
    """The objects to ``podman kube play``, the changes made to them, and the emptyDir volumes to create.

    Args:
        objs: the rendered overlay.
        deployments: names of the Deployments to play (their pods).
        images: manifest image name (before the registry rewrite, e.g. ``genimg-worker``'s
            rendered ``registry.example.com/genimg/worker:0.1.0``) -> local image; matched by
            the path's last component.
        config_overrides: ConfigMap keys to set (addresses the cluster would provide).

    Returns:
        ``(docs, changes, volumes)``: ``volumes`` are ``{"name", "uid", "gid"}`` for
        ``podman volume create`` (tmpfs owned like Kubernetes' fsGroup makes an emptyDir).
    """
    changes: dict[str, Change] = {}

    def note(field: str, why: str) -> None:
        changes.setdefault(field, Change(field, why))

    docs, volumes = [], []
    for d in objs:
        if d["kind"] == "ConfigMap" and any(c.get("configMapRef", {}).get("name") == d["metadata"]["name"]
                                           for dep in deployments for ct in containers(pod_spec(find(objs, "Deployment", dep)))
                                           for c in ct.get("envFrom", [])):
            d = copy.deepcopy(d)
            d["data"].update(config_overrides)
            docs.append(d)
    for dep_name in deployments:
        dep = copy.deepcopy(find(objs, "Deployment", dep_name))
        spec = pod_spec(dep)
        spec["hostNetwork"] = True
        sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
        if sidecars:
            note("initContainers[].restartPolicy: Always (native sidecar)",
                 "podman 4.3 refuses init containers with probes or lifecycle and has no sidecars: "
                 "moved to containers (they start together; the startupProbe gate is lost)")
            spec["initContainers"] = [c for c in spec["initContainers"] if c not in sidecars]
            if not spec["initContainers"]:
                del spec["initContainers"]
            for c in sidecars:
                del c["restartPolicy"]
            spec["containers"] = sidecars + spec["containers"]
        env_of = {}
        for c in spec["containers"]:
            c["image"] = images.get(c["image"].rsplit("/", 1)[-1].split(":")[0], c["image"])
            if c.get("ports"):
                _numeric_probe_ports(c)
                del c["ports"]
                note("containers[].ports", "with host networking podman refuses PortMappings "
                     "(\"PortMappings can only be used with Bridge or slirp4netns networking\"): removed, "
                     "named probe ports replaced by their numbers")
            env_of[c["name"]] = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
            for key in ("command", "args"):
                if any("$(" in w for w in c.get(key, [])):
                    c[key] = [expand(w, env_of[c["name"]] | {"POD_NAME": f"{dep_name}-pod-0"}) for w in c[key]]
                    note(f"containers[].{key} $(VAR)", "podman passes $(VAR) through literally: expanded "
                         "beforehand as the kubelet would (POD_NAME = the pod name podman gives)")
        sc = spec.get("securityContext", {})
        if any("secret" in v for v in spec.get("volumes", [])) or any(
                "secretKeyRef" in e.get("valueFrom", {}) for c in spec["containers"] for e in c.get("env", [])):
            note("Secret objects", "podman 4.3 stores a Secret played from YAML in a form secretKeyRef cannot "
                 "parse: created with `podman secret create` instead, in the form each use reads (podman_secret)")
        for v in spec.get("volumes", []):
            if "secret" in v and "optional" not in v["secret"]:
                v["secret"]["optional"] = False
                note("volumes[].secret.optional", "podman 4.3 dereferences it unset (nil-pointer panic): "
                     "set to false, Kubernetes' default")
            if "emptyDir" in v:
                old = v["name"]
                v["name"] = f"{dep_name}-{old}"
                for c in spec["containers"]:
                    for m in c.get("volumeMounts", []):
                        if m["name"] == old:
                            m["name"] = v["name"]
                volumes.append({"name": v["name"], "uid": sc.get("runAsUser", 0),
                                "gid": sc.get("fsGroup", sc.get("runAsGroup", 0))})
                note("volumes[].emptyDir", "podman makes each emptyDir a named volume shared by name across "
                     "pods, root-owned, on disk (fsGroup, medium and sizeLimit ignored): renamed per "
                     "Deployment and created beforehand as tmpfs owned by runAsUser/fsGroup")
        docs.append(dep)
    return docs, list(changes.values()), volumes


def applied(spec: dict, c: dict, inspect: dict) -> dict[str, bool]:
    """Which of the container's manifest fields ``podman inspect`` shows in effect.

    Keys name the manifest field; ``False`` means podman ignored it.
    """
    cfg, host = inspect["Config"], inspect["HostConfig"]
    sc = security(spec, c)
    out: dict[str, bool] = {}
    if "runAsUser" in sc:
        out["securityContext.runAsUser/runAsGroup"] = cfg["User"] == f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"
    if sc.get("readOnlyRootFilesystem"):
        out["securityContext.readOnlyRootFilesystem"] = bool(host["ReadonlyRootfs"])
    if sc.get("allowPrivilegeEscalation") is False:
        out["securityContext.allowPrivilegeEscalation: false"] = "no-new-privileges" in (host.get("SecurityOpt") or [])
    if sc.get("capabilities", {}).get("drop") == ["ALL"]:
        out["securityContext.capabilities.drop: [ALL]"] = not (inspect.get("EffectiveCaps") or []) and \
            not (host.get("CapAdd") or [])
    if sc.get("seccompProfile", {}).get("type") == "RuntimeDefault":
        out["securityContext.seccompProfile: RuntimeDefault"] = "seccomp=unconfined" not in (host.get("SecurityOpt") or [])
    if "fsGroup" in spec.get("securityContext", {}):
        out["securityContext.fsGroup"] = str(spec["securityContext"]["fsGroup"]) in (host.get("GroupAdd") or [])
    limits = c.get("resources", {}).get("limits", {})
    if "memory" in limits:
        out["resources.limits.memory"] = host["Memory"] == quantity_bytes(limits["memory"])
    if "cpu" in limits:
        out["resources.limits.cpu"] = host["NanoCpus"] == int(quantity_cpus(limits["cpu"]) * 1e9)
    if "requests" in c.get("resources", {}):
        out["resources.requests"] = False  # podman has no scheduler: nothing to apply them to
    grace = spec.get("terminationGracePeriodSeconds")
    if grace is not None:
        out["terminationGracePeriodSeconds"] = cfg.get("StopTimeout") == grace
    hc = (cfg.get("Healthcheck") or {}).get("Test") or []
    live = c.get("livenessProbe")
    if live:
        if "exec" in live:
            out["livenessProbe (exec)"] = " ".join(live["exec"]["command"]) in " ".join(hc)
        else:
            out["livenessProbe (httpGet/tcpSocket)"] = False  # becomes curl/nc, which the images lack
    for probe in ("readinessProbe", "startupProbe"):
        if probe in c:
            out[probe] = False  # podman 4.3 turns only the liveness probe into a health check
    if "lifecycle" in c:
        out["lifecycle.preStop"] = False  # podman runs no hooks on stop
    env = dict(e.split("=", 1) for e in cfg.get("Env") or [])
    names = [e["name"] for e in c.get("env", [])]
    out["env (value, configMapKeyRef, secretKeyRef, fieldRef)"] = all(n in env for n in names)
    if c.get("envFrom"):
        out["envFrom.configMapRef"] = "GENIMG_QUEUE" in env
    return out
