"""A capacity plan on paper: wall time, GPU-hours, Redis and S3 request rates and bytes of one job.

:func:`plan_job` simulates the job the way the deployment in ``deploy/k8s``
runs it (:class:`Keda` holds its settings, :func:`keda_from_deploy` reads them):

1. **Submit**: prompt chunks and one task message per shard
   (:data:`ENQUEUE_MESSAGES_PER_S`, measured by ``make scale``).
2. **Scale-up**: KEDA sees the backlog at its next poll (half a
   ``pollingInterval`` on average) and starts one pod; the HPA then asks
   for ``ceil(backlog / threshold)`` pods (at most ``maxReplicaCount``), adding
   at most ``max(pods, percent)`` per ``periodSeconds`` at each 15-second
   sync. Every new pod needs a GPU node: it works ``node_start_s`` after it
   was asked for (node, image pull, TensorRT engines, Triton ready).
3. **Work**: each pod runs ``GENIMG_CONCURRENCY`` shards at a time, sharing
   its throughput (``images_per_s`` per pod) between them; shards are taken
   in order by whichever slot is free (fair dispatch, prefetch 1). A lone
   shard in the tail runs at its slot's share, which is the pessimistic case.
   On a machine whose CPUs the pods share (``cpus``; the local stack),
   slots slow down in proportion once their demand (``cpu_s_per_image`` x
   rate) exceeds the CPUs (processor sharing).
4. **Finalise**: the last part and ``_SUCCESS`` (seconds; ``make scale``).
5. **Scale-in**: when the backlog is 0, KEDA removes every pod after its
   ``cooldownPeriod``; the cluster autoscaler removes an empty node after
   ``node_scale_down_s`` (its ``scale-down-unneeded-time``, 10 min by
   default). GPU-hours count each node from the moment it is asked for
   until it is gone.

The per-shard request counts are genimg's own protocol (:func:`requests_per_shard`),
Redis commands per shard and image bytes are measured (``benchmarks/plan_check.py``
writes ``benchmarks/results/throughput.json``). Everything is arithmetic on
those inputs; the check against real runs is in ``docs/operations.md``.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from genimg.errors import ValidationError

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
THROUGHPUT_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "throughput.json"
ENQUEUE_MESSAGES_PER_S = 10_900.0
"""Task messages a producer enqueues per second (``make scale``: 10^6 messages in 91.6 s on this machine)."""
QUEUE_BYTES_PER_MESSAGE = 1_176
"""Redis memory per queued task message (``make scale``)."""
DONE_BYTES_PER_SHARD = 50
"""Redis memory per shard of a job's done-hash (``make scale``)."""
MANIFEST_BYTES_PER_ITEM = 51
"""Bytes per item of a shard index, and again of the manifest (``make scale``, noise2img)."""
TAR_BYTES_PER_ITEM = 1_536 + 256
"""Tar bytes per image besides the image: two 512-byte headers, the JSON member padded to 512, image padding."""
REDIS_COMMANDS_PER_SHARD = 60
"""Redis commands per shard when not measured (queue, unacked bookkeeping, running/done marks, checks)."""
HPA_SYNC_S = 15.0
"""The HPA's sync period (kube-controller-manager default)."""
FINALISE_S = 1.0
"""Seconds of the finalisation after the last shard (``make scale``: 1.0 s at 10^4 and at 10^5 shards)."""


@dataclass(frozen=True)
class Keda:
    """What the deployment's autoscaling does (``deploy/k8s``), and node timing it cannot say.

    Attributes:
        max_pods: ``maxReplicaCount`` (one GPU each).
        threshold: shards of backlog per pod the HPA aims at.
        polling_s: KEDA's ``pollingInterval``.
        cooldown_s: ``cooldownPeriod``: seconds of zero backlog before every pod goes.
        scale_up_pods: pods the HPA may add per period.
        scale_up_percent: percent of the current pods it may add per period (the larger wins).
        scale_up_period_s: the scale-up policies' ``periodSeconds``.
        concurrency: ``GENIMG_CONCURRENCY``: shards one pod runs at once.
        grace_s: ``terminationGracePeriodSeconds``.
        soft_limit_s: ``GENIMG_TASK_SOFT_TIME_LIMIT_S``: a shard must finish within it.
        node_start_s: seconds from asking for a pod to its worker taking shards (assumption: GPU node,
            image pull, TensorRT engine build, Triton ready).
        node_scale_down_s: seconds an empty node stays (cluster autoscaler's scale-down-unneeded-time).
        source: where the values came from.
    """

    max_pods: int = 16
    threshold: float = 4.0
    polling_s: float = 15.0
    cooldown_s: float = 300.0
    scale_up_pods: int = 4
    scale_up_percent: float = 100.0
    scale_up_period_s: float = 60.0
    concurrency: int = 2
    grace_s: float = 300.0
    soft_limit_s: float = 210.0
    node_start_s: float = 420.0
    node_scale_down_s: float = 600.0
    source: str = "built-in defaults (deploy/k8s/overlays/gpu as of this version)"


def keda_from_deploy(deploy_dir: Path = DEPLOY_DIR, overlay: str = "gpu") -> Keda:
    """Read the autoscaling settings of ``deploy_dir`` (base plus ``overlay``); defaults where unreadable.

    Needs PyYAML; without it, or without the files (an installed package), the built-in defaults.
    """
    try:
        import yaml
    except ImportError:
        return Keda()
    try:
        base = yaml.safe_load((deploy_dir / "base" / "worker-scaledobject.yaml").read_text())
        over = yaml.safe_load((deploy_dir / "overlays" / overlay / "scaledobject.yaml").read_text())
        deployment = yaml.safe_load((deploy_dir / "base" / "worker-deployment.yaml").read_text())
        env = dict(line.split("=", 1) for line in (deploy_dir / "base" / "worker.env").read_text().splitlines()
                   if line and not line.startswith("#") and "=" in line)
        kustom = yaml.safe_load((deploy_dir / "overlays" / overlay / "kustomization.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return Keda()
    for gen in kustom.get("configMapGenerator", []):
        env.update(dict(x.split("=", 1) for x in gen.get("literals", [])))
    spec = {**base["spec"], **{k: v for k, v in over["spec"].items() if k != "triggers"}}
    trigger = (over["spec"].get("triggers") or base["spec"]["triggers"])[0]["metadata"]
    up = base["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleUp"]["policies"]
    pods = max((p["value"] for p in up if p["type"] == "Pods"), default=4)
    percent = max((p["value"] for p in up if p["type"] == "Percent"), default=100)
    return Keda(max_pods=int(spec["maxReplicaCount"]), threshold=float(trigger["threshold"]),
                polling_s=float(spec["pollingInterval"]), cooldown_s=float(spec["cooldownPeriod"]),
                scale_up_pods=int(pods), scale_up_percent=float(percent),
                scale_up_period_s=float(up[0]["periodSeconds"]),
                concurrency=int(env.get("GENIMG_CONCURRENCY", 1)),
                grace_s=float(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]),
                soft_limit_s=float(env.get("GENIMG_TASK_SOFT_TIME_LIMIT_S", 210)),
                source=f"{deploy_dir}/base + overlays/{overlay}")


@dataclass(frozen=True)
class Profile:
    """Measured figures of one model profile.

    Attributes:
        images_per_s: images per second of one pod (GPU) or one local worker.
        image_bytes: mean encoded image bytes.
        cpu_s_per_image: CPU seconds per image of the whole local stack (for ``cpus``); ``None`` for GPUs.
        redis_commands_per_shard: Redis commands per shard (measured), else :data:`REDIS_COMMANDS_PER_SHARD`.
        text: a text profile (its shards read prompt chunks).
        source: where the figures came from.
    """

    images_per_s: float
    image_bytes: float = 5_000.0
    cpu_s_per_image: float | None = None
    redis_commands_per_shard: float = REDIS_COMMANDS_PER_SHARD
    text: bool = False
    source: str = "given"


def measured_profile(name: str, path: Path = THROUGHPUT_FILE) -> Profile | None:
    """The profile's figures from ``benchmarks/results/throughput.json`` (``plan_check.py``), if there."""
    try:
        doc = json.loads(path.read_text())["profiles"][name]
    except (OSError, ValueError, KeyError):
        return None
    return Profile(images_per_s=float(doc["images_per_s"]), image_bytes=float(doc["image_bytes"]),
                   cpu_s_per_image=doc.get("cpu_s_per_image"),
                   redis_commands_per_shard=float(doc.get("redis_commands_per_shard", REDIS_COMMANDS_PER_SHARD)),
                   text=bool(doc.get("text", False)),
                   source=f"{path.name}: one cpu-flavour worker on {doc.get('machine', 'the development machine')}")


@dataclass(frozen=True)
class Load:
    """One job to plan: ``items`` images of ``profile`` in shards of ``shard_size``."""

    name: str
    items: int
    shard_size: int
    profile: Profile
    prompt_chunk_size: int = 1_000


def requests_per_shard(load: Load, part_shards: int, multipart_threshold: int = 64 * 2**20,
                       multipart_chunk: int = 16 * 2**20) -> dict[str, float]:
    """S3 requests one shard costs, by kind, from genimg's protocol.

    Per shard: HEAD of its index (already committed?), GETs of the prompt chunks it spans (text
    profiles), PUT of the tar (a multipart upload above the threshold: create, parts, complete), PUT
    of the stats and of the index; per manifest part (shared by its ``part_shards`` shards): a GET of
    each index, a GET of its summary, PUTs of the part and its summary.
    """
    tar = load.shard_size * (load.profile.image_bytes + TAR_BYTES_PER_ITEM)
    tar_puts = 1.0 if tar <= multipart_threshold else 2.0 + math.ceil(tar / multipart_chunk)
    gets = (math.ceil(load.shard_size / load.prompt_chunk_size) + 1) if load.profile.text else 0.0
    return {"HEAD": 1.0, "GET": gets + 1.0 + 1.0 / part_shards, "PUT": tar_puts + 2.0 + 2.0 / part_shards}


@dataclass
class _Slot:
    pod: int
    shard: tuple[int, int] | None = None  # (load, shard index)
    left: float = 0.0  # images left in the current shard


@dataclass
class Plan:
    """The outcome of :func:`plan_job` (seconds, images/s, bytes, requests/s)."""

    wall_s: float
    submit_s: float
    first_image_s: float
    work_end_s: float
    finalise_s: float
    pods_peak: int
    gpu_hours_billed: float
    gpu_hours_busy: float
    shards: int
    shard_seconds: float
    images_per_s_steady: float
    redis_commands_per_s: float
    redis_peak_bytes: int
    s3_requests_per_s: dict[str, float]
    output_bytes: int
    warnings: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def simulate(loads: list[Load], keda: Keda, *, pods: int | None = None, cpus: float | None = None,
             start_s: float = 0.0, autoscale: bool = True) -> tuple[float, float, int, list[float]]:
    """Run the loads' shards (in order) on pods that scale as KEDA would; the time the last shard ends.

    Args:
        loads: jobs whose shards are queued in this order at ``start_s``.
        keda: autoscaling settings (``max_pods`` unless ``pods``).
        pods: pod count ceiling (default ``keda.max_pods``).
        cpus: CPUs the pods share (local stack); ``None``: each pod has its own GPU.
        start_s: when the messages are queued.
        autoscale: ``False``: every pod is there from ``start_s`` (a local stack's workers).

    Returns:
        ``(end_s, first_work_s, peak_pods, pod_request_times)``.
    """
    ceiling = pods or keda.max_pods
    queue = [(i, s) for i, load in enumerate(loads) for s in range(-(-load.items // load.shard_size))]
    sizes = [[min(load.shard_size, load.items - s * load.shard_size) for s in range(-(-load.items // load.shard_size))]
             for load in loads]
    total = len(queue)
    requested: list[float] = []  # request time of each pod
    ready: list[tuple[float, int]] = []  # heap of (ready time, pod)
    slots: list[_Slot] = []
    t, nxt, done = start_s, 0, 0
    first_work = math.inf
    last_growth = -math.inf
    next_sync = start_s + keda.polling_s / 2 if autoscale else math.inf
    if not autoscale:
        for p in range(ceiling):
            requested.append(start_s)
            heapq.heappush(ready, (start_s, p))

    def rates() -> list[float]:
        busy = [s for s in slots if s.shard is not None]
        per_pod: dict[int, int] = {}
        for s in busy:
            per_pod[s.pod] = per_pod.get(s.pod, 0) + 1
        out = []
        for s in slots:
            if s.shard is None:
                out.append(0.0)
                continue
            prof = loads[s.shard[0]].profile
            out.append(prof.images_per_s / max(1, keda.concurrency if cpus is None else per_pod[s.pod]))
        if cpus is not None:
            demand = sum(r * (loads[s.shard[0]].profile.cpu_s_per_image or 0.0)
                         for s, r in zip(slots, out, strict=True) if s.shard is not None)
            if demand > cpus:
                out = [r * cpus / demand for r in out]
        return out

    while done < total:
        while ready and ready[0][0] <= t + 1e-9:  # pods that became ready
            _, p = heapq.heappop(ready)
            slots.extend(_Slot(p) for _ in range(keda.concurrency))
        for s in slots:  # free slots take the next shards
            if s.shard is None and nxt < total:
                s.shard, nxt = queue[nxt], nxt + 1
                s.left = float(sizes[s.shard[0]][s.shard[1]])
                first_work = min(first_work, t)
        if autoscale and t >= next_sync - 1e-9:  # KEDA/HPA decide
            backlog = total - done
            want = min(ceiling, math.ceil(backlog / keda.threshold)) if backlog else 0
            have = len(requested)
            if have == 0 and want:
                add = 1
            elif want > have and t - last_growth >= keda.scale_up_period_s - 1e-9:
                add = min(want - have, max(keda.scale_up_pods, math.ceil(have * keda.scale_up_percent / 100)))
            else:
                add = 0
            for _ in range(add):
                heapq.heappush(ready, (t + keda.node_start_s, len(requested)))
                requested.append(t)
            if add:
                last_growth = t
            next_sync = t + HPA_SYNC_S
        r = rates()
        # fast-forward: a single job with every slot busy and no pod on its way runs in whole rounds
        busy = [s for s in slots if s.shard is not None]
        if len(loads) == 1 and not ready and len(busy) == len(slots) and slots and (not autoscale or
                                                                                      len(requested) >= ceiling):
            rounds = (total - nxt) // len(slots) - 1
            if rounds > 0 and len({x for x in r}) == 1:
                t += rounds * loads[0].shard_size / r[0]
                nxt += rounds * len(slots)
                done += rounds * len(slots)
                continue
        events = [s.left / x for s, x in zip(slots, r, strict=True) if s.shard is not None and x > 0]
        if ready:
            events.append(ready[0][0] - t)
        if autoscale:
            events.append(next_sync - t)
        step = max(min(events), 1e-9) if events else HPA_SYNC_S
        for s, x in zip(slots, r, strict=True):
            if s.shard is not None:
                s.left -= x * step
                if s.left <= 1e-6:
                    s.shard, done = None, done + 1
        t += step
    return t, first_work, len(requested), requested


def plan_job(load: Load, keda: Keda, *, part_shards: int = 100, finalise_s: float = FINALISE_S,
             cpus: float | None = None, autoscale: bool = True) -> Plan:
    """Plan one job on the deployment ``keda`` describes (see the module docstring).

    Raises:
        ValidationError: non-positive sizes or throughput.
    """
    if load.items < 1 or load.shard_size < 1 or load.profile.images_per_s <= 0 or keda.max_pods < 1:
        raise ValidationError("items, shard size, images/s and pods must be positive", field="plan")
    shards = -(-load.items // load.shard_size)
    submit_s = shards / ENQUEUE_MESSAGES_PER_S
    end, first, peak, requested = simulate([load], keda, cpus=cpus, start_s=submit_s, autoscale=autoscale)
    wall = end + finalise_s
    gone = wall + (keda.cooldown_s + keda.node_scale_down_s if autoscale else 0.0)
    billed = sum(gone - t for t in requested) / 3600
    busy = load.items / load.profile.images_per_s / 3600
    steady = min(peak, keda.max_pods) * load.profile.images_per_s
    if cpus is not None and load.profile.cpu_s_per_image:
        steady = min(steady, cpus / load.profile.cpu_s_per_image)
    shard_s = load.shard_size / (load.profile.images_per_s / keda.concurrency)
    per_shard = requests_per_shard(load, part_shards)
    shards_per_s = steady / load.shard_size
    warnings = []
    if shard_s > keda.soft_limit_s:
        warnings.append(f"a shard takes ~{shard_s:.0f} s on a pod running {keda.concurrency} at once, above the "
                        f"task soft time limit of {keda.soft_limit_s:.0f} s: lower --shard-size")
    if shards < peak * keda.concurrency:
        warnings.append("fewer shards than slots: lower --shard-size to use every GPU")
    out_bytes = int(load.items * (load.profile.image_bytes + TAR_BYTES_PER_ITEM + 2 * MANIFEST_BYTES_PER_ITEM)
                    + shards * 600)
    return Plan(
        wall_s=wall, submit_s=submit_s, first_image_s=first, work_end_s=end, finalise_s=finalise_s,
        pods_peak=peak, gpu_hours_billed=billed, gpu_hours_busy=busy, shards=shards, shard_seconds=shard_s,
        images_per_s_steady=steady, redis_commands_per_s=shards_per_s * load.profile.redis_commands_per_shard,
        redis_peak_bytes=int(shards * (QUEUE_BYTES_PER_MESSAGE + DONE_BYTES_PER_SHARD)),
        s3_requests_per_s={k: v * shards_per_s for k, v in per_shard.items()}, output_bytes=out_bytes,
        warnings=warnings,
        inputs={"load": {"name": load.name, "items": load.items, "shard_size": load.shard_size},
                "profile": asdict(load.profile), "keda": asdict(replace(keda)), "part_shards": part_shards,
                "cpus": cpus})
