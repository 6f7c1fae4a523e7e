"""``genimg demo``: the main job end to end on this machine, with its results in ``demo-out/``.

With the local stack up (:mod:`genimg.local`; started here if it is not, and
stopped again at the end, also on Ctrl-C, SIGTERM or failure, if it was
started here), the demo submits three jobs through the Python client:

1. ``txt2img``: every prompt of ``examples/prompts.txt`` (110 phrasings and
   misspellings never seen in training), 4 images each;
2. ``noise2img``: 2,000 noise samples;
3. ``faces_x4``: 500 faces from pretrained models (a DCGAN at 64 px, then
   ESRGAN x4 to 256 px RGB; ``--faces-count 0`` skips it);
4. ``expand``: the 20 short source texts of ``examples/expand_sources.txt``,
   each expanded by the language model ``prompt_expander`` (SmolLM2-135M-Instruct,
   :mod:`genimg.expand`) into an image description that ``txt2img`` draws, 2
   images each (``--expand-count 0`` skips it); its contact sheet shows the
   source and the revised prompt under each image;

waits on them with progress bars, and writes for each job, under
``demo-out/txt2img/``, ``demo-out/noise2img/`` and ``demo-out/faces_x4/``:

* ``manifest.parquet``: one row per item (:data:`genimg.index.INDEX_SCHEMA`);
* ``contact_sheet.png``: upscaled images with their prompts and verifier labels;
* ``shards/``: the WebDataset tars (moto keeps objects in memory only);
* ``summary.json``: images ok and failed, images/s, seconds per stage (p50,
  p95), verifier label histogram and, for txt2img, the verifier's agreement
  with the digit each prompt names (:func:`digit_in_prompt`).

``demo-out/summary.json`` holds every job's summary, the stack start-up
seconds and the settings used.

Example::

    genimg demo                                     # what `make demo` runs
    genimg demo --prompts-limit 10 --images-per-prompt 2 --noise-count 50 --out /tmp/demo
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import typer

from genimg.errors import GenImgError

log = logging.getLogger(__name__)

REPO_PROMPTS = Path(__file__).resolve().parents[1] / "examples" / "prompts.txt"
EXPAND_SOURCES = Path(__file__).resolve().parents[1] / "examples" / "expand_sources.txt"
DEFAULT_EXPAND_COUNT = 20
"""Source texts of the demo's expansion job."""
EXPAND_OPTIONS = {"max_new_tokens": 40, "temperature": 0.7}
"""The demo's expansion: SmolLM2 writes up to 40 tokens per description, sampling at temperature 0.7."""
DEFAULT_IMAGES_PER_PROMPT = 4
DEFAULT_NOISE_COUNT = 2_000
DEFAULT_FACES_COUNT = 500
"""Images of the demo's faces_x4 job (pretrained DCGAN faces, ESRGAN x4 to 256 px RGB)."""
FACES_PROFILE = "faces_x4"
DEFAULT_SHARD_SIZE = 100
"""Images per shard: the demo's two jobs make 25 shards, which keep both workers busy to the end
(fastest here with :data:`DEFAULT_SUB_BATCH_SIZE` and 2 workers, against shards of 50, 150, 200 and 250)."""
DEFAULT_SUB_BATCH_SIZE = 100
"""Images per Triton request (fastest here, against 25, 50, 64, 75 and 125)."""
DEFAULT_TIMEOUT_S = 3_600.0
SHEET_PROMPTS = 40
"""Prompts shown on the txt2img contact sheet (all their images)."""
SHEET_NOISE_IMAGES = 64
POLL_S = 0.5
"""Seconds between two status reads while waiting."""

NUMBER_WORDS = {w: d for d, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))}
MISSPELLINGS = {
    "zeero": 0, "zro": 0, "onne": 1, "twoo": 2, "thre": 3, "threee": 3, "fourr": 4, "fuor": 4,
    "fiv": 5, "fyve": 5, "sixx": 6, "sevn": 7, "sevem": 7, "eigth": 8, "eihgt": 8, "nien": 9, "nin": 9,
}
"""Misspelled number words used in ``examples/prompts.txt``, and the digit each means."""
_TOKEN = re.compile(r"[a-z]+|\d+")


def digit_in_prompt(prompt: str | None) -> int | None:
    """The one digit a prompt names, as a numeral (``"a 7"``), a word (``"seven"``) or a known misspelling
    (``"sevn"``); None when it names none, several different ones, or a number above 9.

    >>> digit_in_prompt("the numbr 4"), digit_in_prompt("digit seven drawn in ink"), digit_in_prompt("sevn")
    (4, 7, 7)
    >>> digit_in_prompt("a 3 and a 5") is None, digit_in_prompt("someone") is None, digit_in_prompt("42") is None
    (True, True, True)
    """
    if not prompt:
        return None
    found = set()
    for token in _TOKEN.findall(prompt.lower()):
        if token.isdigit():
            if len(token) > 1:
                return None
            found.add(int(token))
        elif token in NUMBER_WORDS:
            found.add(NUMBER_WORDS[token])
        elif token in MISSPELLINGS:
            found.add(MISSPELLINGS[token])
    return found.pop() if len(found) == 1 else None


def is_misspelled(prompt: str | None) -> bool:
    """Whether the prompt names its digit only by a misspelling from :data:`MISSPELLINGS`."""
    return any(t in MISSPELLINGS for t in _TOKEN.findall((prompt or "").lower()))


def read_prompts(path: Path, limit: int | None = None) -> list[str]:
    """Non-empty lines of ``path`` (``#`` starts a comment line), at most ``limit`` of them."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    return prompts[:limit] if limit else prompts


def percentiles(values: list[float] | np.ndarray) -> dict[str, float | None]:
    """``{"p50", "p95", "n"}`` of ``values`` in seconds (None when empty)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"p50": None, "p95": None, "n": 0}
    return {"p50": round(float(np.percentile(arr, 50)), 6), "p95": round(float(np.percentile(arr, 95)), 6),
            "n": int(arr.size)}


@dataclass
class _Run:
    """One submitted job as the demo tracks it."""

    name: str
    job: Any
    submitted: float
    finished: float | None = None
    status: Any = None


# --------------------------------------------------------------------------- signals and environment


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so the stack is brought down on the way out."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------- waiting


def _wait_all(runs: list[_Run], timeout_s: float, progress: bool) -> None:
    """Poll every job until all are finished, with one progress bar per job; finalise each."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout_s
    bars = Progress(TextColumn("[bold]{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]:>7} img/s"), TextColumn("failed {task.fields[failed]}"),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not progress)
    with bars:
        tasks = {r.name: bars.add_task(r.name, total=r.job.spec.total_items, rate="-", failed=0) for r in runs}
        while True:
            pending = [r for r in runs if r.finished is None]
            for r in pending:
                st = r.job.status()
                elapsed = max(time.monotonic() - r.submitted, 1e-9)
                done = st.items_done + st.items_failed
                bars.update(tasks[r.name], completed=done, rate=f"{st.items_done / elapsed:,.1f}",
                            failed=st.items_failed + st.shards_failed, description=f"{r.name} {st.state}")
                if st.finished:
                    r.finished = time.monotonic()
                    left = max(deadline - time.monotonic(), 1.0)
                    r.status = r.job.wait(progress=False, timeout_s=left)  # writes the manifest if no worker did
            if all(r.finished is not None for r in runs):
                return
            if time.monotonic() > deadline:
                raise GenImgError(f"jobs not finished within {timeout_s:g} s: "
                                  f"{[r.name for r in runs if r.finished is None]}")
            time.sleep(POLL_S)


# --------------------------------------------------------------------------- results


def _tar_image(tars: dict[int, bytes], row: dict[str, Any]) -> np.ndarray:
    from genimg.imaging import decode

    data = tars[row["shard_index"]][row["tar_offset"]:row["tar_offset"] + row["tar_size"]]
    return decode(data)


def _sheet(rows: list[dict[str, Any]], tars: dict[int, bytes], captions: list[str], cols: int, path: Path,
           caption_lines: int = 3, min_cell_width_px: int = 0) -> None:
    from genimg.imaging import contact_sheet

    if not rows:
        return
    images = [_tar_image(tars, r) for r in rows]
    contact_sheet(images, captions, cols=cols, caption_lines=caption_lines,
                  min_cell_width_px=min_cell_width_px).save(path, format="PNG", optimize=True)


def collect(client: Any, run: _Run, out_dir: Path, *, sheet_prompts: int = SHEET_PROMPTS) -> dict[str, Any]:
    """Copy a finished job's manifest, shards and contact sheet to ``out_dir``; return its summary."""
    import pyarrow.parquet as pq

    from genimg.shards import committed_shards

    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / "shards").mkdir(parents=True)
    job, spec = run.job, run.job.spec
    table = job.manifest()
    pq.write_table(table, out_dir / "manifest.parquet")
    store, layout = client.job_store(spec)
    shards = committed_shards(store, layout)
    tars: dict[int, bytes] = {}
    stats: list[dict[str, Any]] = []
    for s in shards:
        tars[s] = store.get_bytes(layout.tar_key(s))
        (out_dir / "shards" / Path(layout.tar_key(s)).name).write_bytes(tars[s])
        stats.append(json.loads(store.get_bytes(layout.stats_key(s), max_bytes=1 << 20)))
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    keys = [r["key"] for r in rows]

    digits = "label" in table.column_names
    if "revised_prompt" in table.column_names:  # an expansion job: source and revised prompt under each image
        shown = ok[:sheet_prompts]
        _sheet(shown, tars, [f"{r['source_prompt']!r} => {r['revised_prompt']}" for r in shown],
               cols=4, path=out_dir / "contact_sheet.png", caption_lines=9, min_cell_width_px=300)
    elif spec.model == "txt2img":
        by_prompt: dict[str, list[dict[str, Any]]] = {}
        for r in ok:
            by_prompt.setdefault(r["prompt"], []).append(r)
        shown = [r for p in list(by_prompt)[:sheet_prompts] for r in by_prompt[p][:4]]
        _sheet(shown, tars, [f"{r['prompt']} -> {r['label']}" for r in shown],
               cols=2 * min(4, spec.images_per_prompt), path=out_dir / "contact_sheet.png")
    elif digits:
        shown = ok[:SHEET_NOISE_IMAGES]
        _sheet(shown, tars, [f"#{r['item_index']} -> {r['label']} ({r['score']:.2f})" for r in shown], cols=8,
               path=out_dir / "contact_sheet.png")
    else:
        shown = ok[:SHEET_NOISE_IMAGES]
        _sheet(shown, tars, [f"#{r['item_index']} seed {r['seed'] % 10**6:06d}" for r in shown], cols=8,
               path=out_dir / "contact_sheet.png")

    wall_s = (run.finished or time.monotonic()) - run.submitted
    per_shard = {stage: [float(s["seconds"][stage]) for s in stats if stage in s.get("seconds", {})]
                 for stage in ("infer", "encode", "upload", "generate", "expand")}
    summary: dict[str, Any] = {
        "job_id": spec.job_id, "model": spec.model, "state": run.status.state if run.status else None,
        "images_total": spec.total_items, "images_ok": len(ok), "images_failed": len(rows) - len(ok),
        "shards": spec.shard_plan().num_shards, "shards_committed": len(shards),
        "shards_failed": run.status.shards_failed if run.status else None,
        "duplicate_keys": len(keys) - len(set(keys)),
        "wall_s": round(wall_s, 3), "images_per_s": round(len(ok) / max(wall_s, 1e-9), 3),
        "seconds_per_stage": {
            "infer_per_item": percentiles([r["infer_s"] for r in ok]),
            "encode_per_item": percentiles([r["encode_s"] for r in ok]),
            **{f"{stage}_per_shard": percentiles(v) for stage, v in per_shard.items()},
        },
        "profile": spec.profile.name, "image_size": [ok[0]["width"], ok[0]["height"]] if ok else None,
        "label_histogram": ({str(d): n for d, n in sorted(Counter(int(r["label"]) for r in ok).items())}
                            if digits else None),
        "settings": {"shard_size": spec.shard_size, "sub_batch_size": spec.sub_batch_size,
                     "images_per_prompt": spec.images_per_prompt, "seed": spec.seed, "output": spec.job_prefix},
        "job_summary": run.status.summary if run.status else None,
    }
    if "revised_prompt" in table.column_names:
        expand_s = sum(per_shard["expand"])
        summary.update(
            expander=ok[0]["expander"] if ok else None, expander_version=ok[0]["expander_version"] if ok else None,
            expand_tokens_mean=round(float(np.mean([r["expand_tokens"] for r in ok])), 2) if ok else None,
            expand_share_of_generate=round(expand_s / max(sum(per_shard["generate"]), 1e-9), 4),
            revised_prompts_distinct=len({r["revised_prompt"] for r in ok}))
    elif spec.model == "txt2img":
        named = [(r, digit_in_prompt(r["prompt"])) for r in ok]
        scored = [(r, d) for r, d in named if d is not None]
        hits = [int(r["label"]) == d for r, d in scored]
        misspelled = [int(r["label"]) == d for r, d in scored if is_misspelled(r["prompt"])]
        spelled = [int(r["label"]) == d for r, d in scored if not is_misspelled(r["prompt"])]
        per_digit = {str(d): round(float(np.mean([int(r["label"]) == d for r, dd in scored if dd == d])), 4)
                     for d in sorted({d for _, d in scored})}
        summary.update(
            verifier_agreement=round(float(np.mean(hits)), 4) if hits else None,
            verifier_agreement_items=len(hits), prompts=len({r["prompt"] for r in rows}),
            verifier_agreement_spelled=round(float(np.mean(spelled)), 4) if spelled else None,
            verifier_agreement_misspelled=round(float(np.mean(misspelled)), 4) if misspelled else None,
            items_misspelled=len(misspelled),
            prompts_without_digit=sorted({r["prompt"] for r, d in named if d is None}),
            verifier_agreement_per_digit=per_digit)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return summary


# --------------------------------------------------------------------------- the command


def run_demo(*, prompts_path: Path, prompts_limit: int | None, images_per_prompt: int, noise_count: int,
             out: Path, faces_count: int = DEFAULT_FACES_COUNT, expand_count: int = DEFAULT_EXPAND_COUNT,
             workers: int, shard_size: int, sub_batch_size: int, seed: int, timeout_s: float,
             keep_up: bool, progress: bool, state_dir: Path | None) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the overall summary also written to ``out``.

    Raises:
        GenImgError: the stack did not come up, or a job did not finish in time.
    """
    from genimg.local import LocalStack
    from producer.client import Client

    def say(line: str) -> None:
        typer.echo(f"genimg demo: {line}", err=True)

    prompts = read_prompts(prompts_path, prompts_limit)
    if not prompts:
        raise GenImgError(f"no prompts in {prompts_path}")
    stack = LocalStack(state_dir)
    t0 = time.monotonic()
    state = stack.running()
    started = False
    if state is None:
        say(f"bringing the local stack up ({workers} workers)")
        state, started = stack.up(workers, say=lambda line: say(f"local: {line}"))
    else:
        say(f"using the local stack that is already up ({stack.state_path})")
    stack_s = time.monotonic() - t0
    runs: list[_Run] = []
    try:
        with _environment(state.full_env()), Client() as client:
            output = state.env["GENIMG_OUTPUT"]
            t1 = time.monotonic()
            runs.append(_Run("txt2img", client.submit(
                prompts, images_per_prompt=images_per_prompt, output=output, seed=seed, shard_size=shard_size,
                sub_batch_size=sub_batch_size, name="demo-txt2img"), time.monotonic()))
            runs.append(_Run("noise2img", client.submit(
                count=noise_count, model="noise2img", output=output, seed=seed, shard_size=shard_size,
                sub_batch_size=sub_batch_size, name="demo-noise2img"), time.monotonic()))
            if faces_count:
                runs.append(_Run(FACES_PROFILE, client.submit(
                    count=faces_count, model=FACES_PROFILE, output=output, seed=seed, shard_size=shard_size,
                    sub_batch_size=sub_batch_size, name="demo-faces-x4"), time.monotonic()))
            if expand_count:
                sources = read_prompts(EXPAND_SOURCES, expand_count)
                runs.append(_Run("expand", client.submit(
                    sources, images_per_prompt=2, output=output, seed=seed, shard_size=10,
                    sub_batch_size=sub_batch_size, name="demo-expand", expand=EXPAND_OPTIONS), time.monotonic()))
                say(f"submitted {len(sources)} source texts for the language model to describe "
                    f"(job {runs[-1].job.job_id})")
            say(f"submitted {len(prompts)} prompts x {images_per_prompt} (job {runs[0].job.job_id}), "
                f"{noise_count} noise samples (job {runs[1].job.job_id})"
                + (f" and {faces_count} faces x4 (job {runs[2].job.job_id})" if faces_count else ""))
            try:
                _wait_all(runs, timeout_s, progress)
            except BaseException:
                for r in runs:
                    if r.finished is None:
                        with contextlib.suppress(GenImgError):
                            r.job.cancel()
                raise
            jobs_s = time.monotonic() - t1
            out.mkdir(parents=True, exist_ok=True)
            summaries = {r.name: collect(client, r, out / r.name) for r in runs}
        total_ok = sum(s["images_ok"] for s in summaries.values())
        overall = {
            "jobs": summaries,
            "images_ok": total_ok, "images_failed": sum(s["images_failed"] for s in summaries.values()),
            "jobs_wall_s": round(jobs_s, 3), "images_per_s": round(total_ok / max(jobs_s, 1e-9), 3),
            "stack_startup_s": round(stack_s, 3), "stack_started_by_demo": started,
            "stack": {"workers": len(state.workers()) or state.info.get("workers"),
                      "external": state.external, "startup_s": state.info.get("startup_s", {})},
        }
        (out / "summary.json").write_text(json.dumps(overall, indent=2, sort_keys=True, default=str))
        return overall
    finally:
        if started and not keep_up:
            say("bringing the local stack down")
            stack.down(say=lambda line: say(f"local: {line}"))


def demo(
    prompts: Path = typer.Option(None, "--prompts", help="Prompt file, one a line (default examples/prompts.txt)."),
    prompts_limit: int = typer.Option(None, "--prompts-limit", min=1, help="Use only the first N prompts."),
    images_per_prompt: int = typer.Option(DEFAULT_IMAGES_PER_PROMPT, "--images-per-prompt", min=1, max=64),
    noise_count: int = typer.Option(DEFAULT_NOISE_COUNT, "--noise-count", min=1, help="Items of the noise2img job."),
    faces_count: int = typer.Option(DEFAULT_FACES_COUNT, "--faces-count", min=0,
                                    help="Items of the faces_x4 job (256 px RGB faces); 0 skips it."),
    expand_count: int = typer.Option(DEFAULT_EXPAND_COUNT, "--expand-count", min=0,
                                     help="Source texts the language model expands (examples/expand_sources.txt, "
                                          "up to 20); 0 skips the job."),
    out: Path = typer.Option(Path("demo-out"), "--out", help="Where manifests, sheets and summaries go."),
    workers: int = typer.Option(None, "--workers", min=1,
                                help="Workers, if the demo starts the stack (default: genimg.local's)."),
    shard_size: int = typer.Option(DEFAULT_SHARD_SIZE, "--shard-size", min=1),
    sub_batch_size: int = typer.Option(DEFAULT_SUB_BATCH_SIZE, "--sub-batch-size", min=1, max=256),
    seed: int = typer.Option(0, "--seed", min=0),
    timeout_s: float = typer.Option(DEFAULT_TIMEOUT_S, "--timeout-s", help="Longest wait for the jobs."),
    keep_up: bool = typer.Option(False, "--keep-up", help="Leave a stack the demo started running."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    state_dir: Path = typer.Option(None, "--dir", envvar="GENIMG_LOCAL_DIR", help="Local stack state directory."),
) -> None:
    """Run the main job end to end on the local stack and write the results to demo-out/.

    Example: genimg demo --prompts-limit 10 --images-per-prompt 2 --noise-count 50 --out /tmp/demo
    """
    from genimg.local import DEFAULT_WORKERS

    path = prompts or (Path("examples/prompts.txt") if Path("examples/prompts.txt").is_file() else REPO_PROMPTS)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        overall = run_demo(prompts_path=path, prompts_limit=prompts_limit, images_per_prompt=images_per_prompt,
                           noise_count=noise_count, faces_count=faces_count, expand_count=expand_count, out=out,
                           workers=workers or DEFAULT_WORKERS,
                           shard_size=shard_size, sub_batch_size=sub_batch_size, seed=seed, timeout_s=timeout_s,
                           keep_up=keep_up, progress=not no_progress, state_dir=state_dir)
    except GenImgError as e:
        typer.echo(f"genimg demo: error: {e}", err=True)
        raise typer.Exit(3) from None
    except KeyboardInterrupt:
        typer.echo("genimg demo: interrupted", err=True)
        raise typer.Exit(130) from None
    for name, s in overall["jobs"].items():
        agree = ""
        if s.get("verifier_agreement") is not None:
            parts = [f"{label} {s[key]:.1%}" for label, key in (("spelled right", "verifier_agreement_spelled"),
                                                                  ("misspelled", "verifier_agreement_misspelled"))
                     if s.get(key) is not None]  # a part with no prompts says nothing rather than 0.0 %
            agree = (f", verifier agrees with the prompt's digit on {s['verifier_agreement']:.1%}"
                     + (f" ({', '.join(parts)})" if parts else ""))
        typer.echo(f"{name}: {s['images_ok']} images ok, {s['images_failed']} failed, {s['images_per_s']:.1f} img/s"
                   f"{agree} -> {out / name}")
    typer.echo(f"all jobs: {overall['images_ok']} images in {overall['jobs_wall_s']:.1f} s "
               f"({overall['images_per_s']:.1f} img/s); summary {out / 'summary.json'}")
    failed = any(s["state"] != "succeeded" for s in overall["jobs"].values())
    raise typer.Exit(1 if failed else 0)


def register(app: typer.Typer) -> None:
    """Mount ``genimg local ...`` and ``genimg demo`` on the root app."""
    from genimg.local_cli import app as local_app

    app.add_typer(local_app, name="local")
    app.command("demo")(demo)
