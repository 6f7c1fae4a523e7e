"""Medians, ratios, the CPU-per-image breakdown, the chart and the Markdown table of a ``bench.py`` run.

* :func:`summarize`: one system's runs → medians over rounds, pooled stage
  percentiles, peak RSS, CPU per image per process kind and per Triton model,
  idle CPU (pipeline fill, middle, drain) per image.
* :func:`add_ratios`: ratios of the systems' median images/s, and the targets.
* :func:`breakdown`: where each pipeline's CPU per image goes, genimg against its
  in-process bound, in milliseconds of CPU (or of idle CPU capacity) per image.
* :func:`write_outputs`: the JSON, a PNG chart and a Markdown table next to it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

TXT2IMG = ("upper_bound", "upper_bound_per_image", "genimg_default", "genimg_best", "genimg_per_image",
           "genimg_previous_default", "naive_celery", "ray_data")
FACES = ("faces_upper_bound", "faces_genimg", "faces_ray_data")
SYSTEMS = TXT2IMG + FACES
"""Every system of the rounds, in table order."""

TARGETS = {
    "genimg_best/upper_bound": (0.9, "issue 20: both doing per-prompt work once"),
    "genimg_best/ray_data_steady": (1.2, "issue 20: Ray Data at its steady state"),
    "genimg_best/genimg_previous_default": (1.5, "issue 20: images_per_prompt=4 against the previous default "
                                                 "(per-image encoding, default settings), same run"),
    "genimg_best/naive_celery": (10.0, "issue 9"),
    "faces_genimg/faces_upper_bound": (0.9, "issue 14"),
    "faces_genimg/faces_ray_data": (1.2, "issue 14"),
}
"""Ratio → (target, where it comes from)."""


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 6) if xs else None


def _pcts(samples: list[float]) -> dict:
    s = sorted(samples)
    if not s:
        return {"p50": None, "p95": None, "n": 0}
    return {"p50": round(s[len(s) // 2], 5), "p95": round(s[min(len(s) - 1, int(0.95 * len(s)))], 5), "n": len(s)}


def _per_image_medians(runs: list[dict], key: str) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for r in runs:
        for k, v in (r.get(key) or {}).items():
            acc.setdefault(k, []).append(1000 * v / r["images"])
    return {k: round(median(v) or 0.0, 4) for k, v in sorted(acc.items())}


def summarize(runs: list[dict]) -> dict:
    """Medians over rounds, pooled stage percentiles, peak RSS per kind, CPU and idle ms per image."""
    out: dict = {"rounds": len(runs)}
    for k in ("images_per_s", "seconds", "cpu_s_per_image", "host_busy_share_other"):
        out[k] = median([r.get(k) for r in runs])
    out["images_per_s_all"] = [r["images_per_s"] for r in runs]
    if runs and all(r.get("actor_ready_s") is not None for r in runs):  # Ray: also without the pool's start-up
        out["steady_images_per_s"] = median([r["images"] / (r["seconds"] - r["actor_ready_s"]) for r in runs])
        out["actor_ready_s"] = median([r["actor_ready_s"] for r in runs])
    stages: dict[str, list[float]] = {}
    for r in runs:
        for k, v in (r.get("stage_samples") or {}).items():
            stages.setdefault(k, []).extend(v)
    out["stage_seconds"] = {k: _pcts(v) for k, v in stages.items()}
    out["stage_unit"] = runs[0].get("stage_unit") if runs else None
    rss: dict[str, dict] = {}
    for r in runs:
        for kind, v in (r.get("peak_rss_mib") or {}).items():
            cur = rss.setdefault(kind, {"process": 0.0, "total": 0.0, "processes": 0})
            cur["process"] = max(cur["process"], v["process"])
            cur["total"] = max(cur["total"], v["total"])
            cur["processes"] = max(cur["processes"], v["processes"])
    out["peak_rss_mib"] = rss
    cpu_kind: dict[str, list[float]] = {}
    for r in runs:
        for kind, v in (r.get("cpu_s_by_kind") or {}).items():
            cpu_kind.setdefault(kind, []).append(v / r["images"])
    out["cpu_s_per_image_by_kind"] = {k: median(v) for k, v in cpu_kind.items()}
    out["cpu_ms_per_image_by_model"] = _per_image_medians(runs, "cpu_s_by_model")
    out["cpu_ms_per_image_by_stage"] = _per_image_medians(runs, "cpu_s_by_stage")
    with_idle = [r for r in runs if r.get("idle")]
    if with_idle:
        keys = [k for k in with_idle[0]["idle"] if k.startswith("idle_")]
        out["idle_ms_per_image"] = {k.removeprefix("idle_").removesuffix("_cpu_s"): median(
            [1000 * r["idle"][k] / r["images"] for r in with_idle]) for k in keys}
        out["fill_s"] = median([r["idle"]["fill_s"] for r in with_idle])
        out["drain_s"] = median([r["idle"]["drain_s"] for r in with_idle])
    out["capacity_ms_per_image"] = median([1000 * r["n_cpus"] * r["seconds"] / r["images"] for r in runs
                                           if r.get("n_cpus")])
    tm = [r["triton_models"] for r in runs if r.get("triton_models")]
    if tm:
        out["triton_models"] = {m: {k: median([t[m][k] for t in tm if m in t]) for k in tm[0][m]} for m in tm[0]}
    out["loadavg_1m"] = [r["loadavg_1m"] for r in runs]
    out["unit_cpu_ms"] = [(r.get("speed") or {}).get("unit_cpu_ms") for r in runs]  # per run: harmonic means
    if runs and runs[0].get("config"):
        out["config"] = runs[0]["config"]
    return out


def add_ratios(result: dict) -> None:
    """``result["ratios"]`` and ``result["targets"]`` from the systems' median images/s.

    ``*_ray_data_steady`` compares with Ray's rate after its actor pool is ready
    (``steady_images_per_s``), i.e. without the pool's start-up that each Ray Data job pays;
    ``previous_*`` are the figures of the run before issue 20 (``result["previous"]``: every
    image's prompt embedded, 100 prompts x 50 images).
    """
    sysd = result.get("systems", {})
    ips = {k: v.get("images_per_s") for k, v in sysd.items()}
    for ray in ("ray_data", "faces_ray_data"):
        ips[f"{ray}_steady"] = sysd.get(ray, {}).get("steady_images_per_s")
    for k, v in (result.get("previous") or {}).get("images_per_s", {}).items():
        ips[f"previous_{k}"] = v

    def ratio(a: str, b: str) -> float | None:
        return round(ips[a] / ips[b], 3) if ips.get(a) and ips.get(b) else None

    pairs = [(g, b) for g in ("genimg_best", "genimg_default")
             for b in ("upper_bound", "naive_celery", "ray_data", "ray_data_steady")]
    pairs += [("genimg_best", "genimg_per_image"), ("genimg_best", "genimg_previous_default"),
              ("genimg_default", "genimg_previous_default"), ("upper_bound", "upper_bound_per_image"),
              ("genimg_per_image", "upper_bound_per_image"), ("genimg_best", "previous_genimg_best"),
              ("genimg_default", "previous_genimg_default"), ("upper_bound", "previous_upper_bound"),
              ("genimg_per_image", "previous_genimg_best"), ("upper_bound", "naive_celery"),
              ("faces_genimg", "faces_upper_bound"), ("faces_genimg", "faces_ray_data"),
              ("faces_genimg", "faces_ray_data_steady")]
    result["ratios"] = {f"{a}/{b}": ratio(a, b) for a, b in pairs}
    by_round = {f"{a}/{b}": _by_round(sysd, a, b) for a, b in pairs if not b.startswith("previous_")}
    result["ratios_by_round"] = {k: v for k, v in by_round.items() if v}
    result["ratios_quiet"] = {k: median([x["ratio"] for x in v if max(x["others"]) <= QUIET]) for k, v in
                              result["ratios_by_round"].items()}
    result["ratios_load_corrected"] = {k: _corrected(sysd, *k.split("/")) for k in result["ratios_by_round"]}
    result["ratios_speed_corrected"] = {k: _speed_corrected(sysd, *k.split("/")) for k in result["ratios_by_round"]}
    result["quiet_limit"] = QUIET

    def met(value: float | None, t: float) -> bool | None:
        return None if value is None else bool(value >= t)

    result["targets"] = {k: {"target": t, "source": why, "met": met(result["ratios"].get(k), t),
                             "met_quiet": met(result["ratios_quiet"].get(k), t),
                             "met_speed_corrected": met(result["ratios_speed_corrected"].get(k), t)}
                         for k, (t, why) in TARGETS.items()}


QUIET = 0.1
"""A round's runs count as quiet when other processes used at most this share of the CPUs during each."""


def _rate(run: dict, steady: bool) -> float:
    if steady:
        return run["images"] / (run["seconds"] - run["actor_ready_s"])
    return run["images_per_s"]


def _by_round(sysd: dict, a: str, b: str) -> list[dict]:
    """``a``/``b`` within each round (the runs of one round are minutes apart), with both runs' others' share."""
    b_sys, steady = (b.removesuffix("_steady"), True) if b.endswith("_steady") else (b, False)
    ra, rb = (sysd.get(a) or {}).get("runs") or [], (sysd.get(b_sys) or {}).get("runs") or []
    return [{"round": i + 1, "ratio": round(_rate(x, False) / _rate(y, steady), 3),
             "others": [x["host_busy_share_other"], y["host_busy_share_other"]]}
            for i, (x, y) in enumerate(zip(ra, rb))]


def _corrected(sysd: dict, a: str, b: str) -> float | None:
    """Ratio of the medians of images/s / (1 - others' share): each run scaled to the CPUs others left it."""
    b_sys, steady = (b.removesuffix("_steady"), True) if b.endswith("_steady") else (b, False)

    def m(name: str, st: bool) -> float | None:
        runs = (sysd.get(name) or {}).get("runs") or []
        return median([_rate(r, st) / max(0.3, 1 - r["host_busy_share_other"]) for r in runs])

    x, y = m(a, False), m(b_sys, steady)
    return round(x / y, 3) if x and y else None


def _speed_corrected(sysd: dict, a: str, b: str) -> float | None:
    """Ratio of the medians of images/s x the run's speed-probe unit cost (``benchmarks/_speed.py``).

    A run during which the host was slow (a fixed unit of work cost more CPU) is scaled up by that much; the
    scale cancels between systems measured at the same speed. A diagnostic: it assumes every system slows in
    proportion to the probe. ``None`` when a run has no probe summary (too few samples, a failed probe).
    """
    b_sys, steady = (b.removesuffix("_steady"), True) if b.endswith("_steady") else (b, False)

    def m(name: str, st: bool) -> float | None:
        runs = (sysd.get(name) or {}).get("runs") or []
        key = "speed_steady" if st else "speed"
        if not runs or any(not (r.get(key) or {}).get("unit_cpu_ms") for r in runs):
            return None
        return median([_rate(r, st) * r[key]["unit_cpu_ms"] for r in runs])

    x, y = m(a, False), m(b_sys, steady)
    return round(x / y, 3) if x and y else None


def breakdown(genimg: dict, bound: dict) -> dict:
    """Where a pipeline's CPU per image goes: genimg (``summarize`` of its runs) against the in-process bound.

    Every figure is milliseconds per image. ``capacity`` = CPUs x seconds / images
    (what one image costs of the machine, busy or not) = ``used`` + ``idle``. Per
    model: genimg's Triton stub processes (``/proc``) against the bound's
    ``thread_time`` around ``Session.run`` (``stub_overhead`` = the difference:
    the Python backend's shared-memory copies and ``execute`` wrapper;
    ``other_stubs``: the stubs of models the pipeline does not use, polling). The
    worker's PNG encoding and pHashes are the bound's (same functions, same
    images); ``worker_other`` is the rest of the worker (gRPC client, tar,
    index, S3 client, Celery). Idle capacity is split into pipeline fill (before Triton's
    stubs first get busy), drain (after they last are) and the middle.
    """
    g_kind = {k: 1000 * v for k, v in (genimg.get("cpu_s_per_image_by_kind") or {}).items() if v is not None}
    b_stage = bound.get("cpu_ms_per_image_by_stage") or {}
    g_model = genimg.get("cpu_ms_per_image_by_model") or {}
    local = ("inputs", "read", "encode", "phash", "write")
    models = {m: {"genimg": round(g_model.get(m, 0.0), 3), "bound": round(v, 3),
                  "stub_overhead": round(g_model.get(m, 0.0) - v, 3)} for m, v in b_stage.items() if m not in local}
    idle_stubs = sum(v for m, v in g_model.items() if m not in models)
    encode, phash = b_stage.get("encode", 0.0), b_stage.get("phash", 0.0)
    worker = g_kind.get("genimg_worker", 0.0)
    used_g = 1000 * (genimg.get("cpu_s_per_image") or 0.0)
    used_b = 1000 * (bound.get("cpu_s_per_image") or 0.0)
    out = {
        "capacity": {"genimg": genimg.get("capacity_ms_per_image"), "bound": bound.get("capacity_ms_per_image")},
        "used": {"genimg": round(used_g, 3), "bound": round(used_b, 3)},
        "models": models,
        "other_stubs": round(idle_stubs, 3),
        "bound_other": {k: round(v, 3) for k, v in b_stage.items() if k in local and k not in ("encode", "phash")},
        "png_encode": round(encode, 3),
        "phash": round(phash, 3),
        "worker_other": round(worker - encode - phash, 3),
        "triton_core": round(g_kind.get("triton", 0.0), 3),
        "s3_server": round(g_kind.get("s3", 0.0), 3),
        "redis": round(g_kind.get("redis", 0.0), 3),
        "producer": round(g_kind.get("genimg_producer", 0.0), 3),
        "idle": genimg.get("idle_ms_per_image"),
        "fill_s": genimg.get("fill_s"), "drain_s": genimg.get("drain_s"),
    }
    cap_b = bound.get("capacity_ms_per_image")
    out["bound_idle"] = round(cap_b - used_b, 3) if cap_b else None
    return out


def write_outputs(result: dict, out: Path) -> None:
    """The JSON, its chart (``.png``) and Markdown table (``.md``) next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result["chart"] = str(out.with_suffix(".png"))
    chart(result, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(result))
    out.write_text(json.dumps(result, indent=1))


def chart(result: dict, path: Path) -> None:
    """Bar chart of median images/s (min-max bars), txt2img and faces_x4 side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(TXT2IMG, "txt2img 112px"), (FACES, "faces_x4 256px RGB")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110, gridspec_kw={"width_ratios": [7, 3]})
    for ax, (names_all, title) in zip(axes, groups):
        names = [s for s in names_all if result["systems"].get(s, {}).get("images_per_s")]
        if not names:
            ax.set_visible(False)
            continue
        vals = [result["systems"][s]["images_per_s"] for s in names]
        lo = [v - min(result["systems"][s]["images_per_s_all"]) for s, v in zip(names, vals)]
        hi = [max(result["systems"][s]["images_per_s_all"]) - v for s, v in zip(names, vals)]
        colors = ["#888888" if "upper_bound" in s else "#2a7ab9" if "genimg" in s else "#d98c2b" for s in names]
        bars = ax.bar(names, vals, yerr=[lo, hi], capsize=4, color=colors)
        for name, b, v in zip(names, bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v / 2, f"{v:.0f}", ha="center", va="center", fontsize=9,
                    color="white", fontweight="bold")
            steady = result["systems"][name].get("steady_images_per_s")
            if steady:
                ax.plot([b.get_x(), b.get_x() + b.get_width()], [steady, steady], "k--", lw=1)
                ax.text(b.get_x() + b.get_width() / 2, steady, f"steady {steady:.0f}", ha="center", va="bottom",
                        fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    axes[0].set_ylabel("images/s (median, min-max bars)")
    m, st = result["machine"], result["settings"]
    fig.suptitle(f"{st['images']} txt2img images ({st['images_per_prompt']} per prompt), {st['faces_images']} faces; "
                 f"{len(result['budget']['cpus'])} CPUs ({m['cpu_model'][:40]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The systems table and the ratios table."""
    s, r = result["systems"], result["ratios"]
    lines = ["| system | images/s (median) | runs | CPU ms/image | others' CPU share | p50 infer s (unit) | "
             "peak RSS MiB (largest kinds) |", "| --- | ---: | --- | ---: | ---: | --- | --- |"]
    for name in SYSTEMS:
        v = s.get(name) or {}
        if not v.get("images_per_s"):
            lines.append(f"| {name} | skipped | | | | | {v.get('skipped', '')} |")
            continue
        inf = v["stage_seconds"].get("infer", {}).get("p50")
        rss = sorted(v["peak_rss_mib"].items(), key=lambda kv: -kv[1]["total"])[:3]
        rss_s = ", ".join(f"{k} {x['total']:.0f}" for k, x in rss)
        lines.append(f"| {name} | {v['images_per_s']:.1f} | {', '.join(f'{x:.0f}' for x in v['images_per_s_all'])} "
                     f"| {1000 * v['cpu_s_per_image']:.2f} | {v.get('host_busy_share_other')} | {inf} "
                     f"({v['stage_unit']}) | {rss_s} |")
    q, c, rounds = result.get("ratios_quiet", {}), result.get("ratios_load_corrected", {}), \
        result.get("ratios_by_round", {})
    sc = result.get("ratios_speed_corrected", {})
    lines += ["", f"| ratio | of the medians | per round (others' share of each run) | quiet rounds "
                  f"(others <= {result.get('quiet_limit', QUIET)}) | load-corrected | speed-corrected (diagnostic) | target |",
              "| --- | ---: | --- | ---: | ---: | ---: | --- |"]

    def row(k: str, target: str) -> str:
        per = "; ".join(f"{x['ratio']} ({x['others'][0]:.2f}/{x['others'][1]:.2f})" for x in rounds.get(k, []))
        value = r.get(k) if r.get(k) is not None else "n/a"
        return f"| {k} | {value} | {per} | {q.get(k) if q.get(k) is not None else 'n/a'} | " \
               f"{c.get(k) if c.get(k) is not None else 'n/a'} | {sc.get(k) if sc.get(k) is not None else 'n/a'} " \
               f"| {target} |"

    for k, t in result["targets"].items():
        verdicts = {True: "met", False: "missed", None: "not measured"}
        extra = "".join(f"; {name} {verdicts[t.get(key)]}" for name, key in
                        (("quiet", "met_quiet"), ("speed-corrected", "met_speed_corrected")) if t.get(key) is not None)
        lines.append(row(k, f"{t['target']} ({verdicts[t['met']]}{extra}; {t['source']})"))
    for k in r:
        if k not in result["targets"]:
            lines.append(row(k, ""))
    return "\n".join(lines) + "\n"
