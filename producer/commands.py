"""The producer's ``genimg`` sub-commands: submit, status, wait, cancel, resume, manifest, ls, plan.

Exit codes (every command):

- 0: done (for ``wait`` and ``submit --wait``: the job succeeded);
- 1: the job failed or was cancelled;
- 2: invalid input (a bad option, prompt, file, output URL or job id, an
  invalid ``GENIMG_*`` setting, an idempotency key reused for a different
  spec); the message on stderr names the field, variable or key; nothing was
  stored or enqueued;
- 3: Redis or storage unavailable, or another operational error;
- 124: ``--timeout-s`` passed while waiting (the job goes on).

Options fall back to ``GENIMG_*`` environment variables (shown in ``--help``);
``--json`` prints one JSON document on stdout for scripts, logs go to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer

from genimg.errors import ConfigError, ConflictError, GenImgError, ValidationError
from genimg.redaction import REDACTION

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_INVALID = 2
EXIT_UNAVAILABLE = 3
EXIT_TIMEOUT = 124

if TYPE_CHECKING:
    from producer.job import JobStatus

P = ParamSpec("P")
R = TypeVar("R")

# ---- shared options (typer.Option defaults are None: Client and JobSpec fill in the rest)

RedisUrl = Annotated[str | None, typer.Option(
    "--redis-url", envvar="GENIMG_REDIS_URL", show_default=False,
    help="Broker URL, redis:// or rediss:// (default redis://127.0.0.1:6379/0); passwords are never printed.")]
Queue = Annotated[str | None, typer.Option("--queue", envvar="GENIMG_QUEUE", help="Celery queue (default: genimg).")]
KeyPrefix = Annotated[str | None, typer.Option("--key-prefix", envvar="GENIMG_KEY_PREFIX",
                                                  help="Prefix of genimg's Redis keys (default: genimg).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
JobId = Annotated[str, typer.Argument(help="Job id (32 hex digits), as printed by submit.", show_default=False)]
OutputHint = Annotated[str | None, typer.Option(
    "--output", envvar="GENIMG_OUTPUT",
    help="The job's output URL: finds job.json in storage when Redis no longer knows the job.")]
TimeoutS = Annotated[float | None, typer.Option("--timeout-s", help="Stop waiting after this many seconds (exit 124).")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="No progress bar.")]
KEEP_IF_HELP = ("Keep only images whose metadata passes COLUMN OP NUMBER, e.g. 'score >= 0.9' (an int or float "
                "column of the profile; op: >= > <= < == !=).")
REGENERATE_HELP = ("With --keep-if: extra seeds an item may try until it passes, 0-64 (default: 0); an item that "
                   "never passes is failed keep_if_unmet.")
DEDUP_HELP = ("Mark duplicates in the manifest's duplicate_of column: exact (same sha256) or near (pHash within 4 "
              "of 64 bits). Default: only reported in dedup.json and the card.")


def _err(message: str) -> None:
    typer.echo(REDACTION.redact(message), err=True)


@contextmanager
def _exit_codes() -> Iterator[None]:
    """Turn genimg's errors into the documented exit codes and one stderr line."""
    from producer.job import JobNotFoundError, WaitTimeoutError

    try:
        yield
    except ValidationError as e:
        _err(f"genimg: invalid {e.field or 'input'}: {str(e).removeprefix(f'{e.field}: ')}")
        raise typer.Exit(EXIT_INVALID) from None
    except (JobNotFoundError, ConfigError, ConflictError) as e:
        _err(f"genimg: {e}")
        raise typer.Exit(EXIT_INVALID) from None
    except WaitTimeoutError as e:
        _err(f"genimg: {e}")
        raise typer.Exit(EXIT_TIMEOUT) from None
    except GenImgError as e:
        _err(f"genimg: {type(e).__name__}: {e}")
        raise typer.Exit(EXIT_UNAVAILABLE) from None


class _Terminated(KeyboardInterrupt):
    """SIGTERM during a submit, unwound like Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated(signal.Signals(signum).name)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (what Kubernetes, CI runners and ``timeout`` send) unwinds a submit as Ctrl-C does: what it
    stored is deleted and its idempotency key released; the command then exits 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except _Terminated:
        _err("genimg: submit terminated (SIGTERM)")
        raise typer.Exit(143) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _guarded(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with _exit_codes():
            return fn(*args, **kwargs)

    return wrapper


def _client(redis_url: str | None, queue: str | None, key_prefix: str | None) -> Any:
    from producer.client import Client

    return Client(redis_url, queue=queue, key_prefix=key_prefix)


def _print_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=None, sort_keys=True, default=str))


def _show(st: JobStatus, as_json: bool) -> None:
    """A job's status on stdout: its JSON, or one line."""
    if as_json:
        _print_json(st.to_dict())
    else:
        typer.echo(_status_line(st))


def _status_line(st: Any) -> str:
    label = f" ({st.name})" if st.name else ""
    return (f"{st.job_id}{label}  {st.state:<9}  images {st.items_done:,}/{st.items_total:,}"
            f"  failed items {st.items_failed:,}  shards done {st.shards_done}/{st.num_shards}"
            f" (running {st.shards_running}, failed {st.shards_failed})  {st.output}")


def _final_exit(st: Any) -> int:
    return EXIT_OK if st.state == "succeeded" else EXIT_JOB_FAILED


def _params(items: list[str], model: str | None) -> dict[str, Any]:
    """``--param KEY=VALUE`` options as a dict, each value typed by the profile's declaration."""
    from genimg.profiles import load_profiles
    from genimg.profiles.params import parse_cli_param

    profiles = load_profiles()
    profile = profiles.profiles.get(model) if model else None
    out: dict[str, Any] = {}
    for text in items:
        key, value = parse_cli_param(text, profile)
        if key in out:
            raise ValidationError(f"given twice: {key}", field=f"params.{key}")
        out[key] = value
    return out


# ---- commands


def submit(
    prompts_file: Annotated[Path | None, typer.Option(
        "--prompts", help="Prompt file: .txt (one a line), .jsonl, .csv or .parquet; streamed.",
        show_default=False)] = None,
    prompt: Annotated[list[str] | None, typer.Option(
        "--prompt", help="A prompt (repeat for more).", show_default=False)] = None,
    count: Annotated[int | None, typer.Option("--count", help="Number of images (noise profiles).",
                                                 show_default=False)] = None,
    model: Annotated[str | None, typer.Option(
        "--model", envvar="GENIMG_MODEL",
        help="A model profile (genimg models list); default txt2img with prompts, noise2img with --count.")] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="A generation parameter KEY=VALUE of the profile (repeat); KEY=1,50,100 is a sweep.",
        show_default=False)] = None,
    negative_prompt: Annotated[str | None, typer.Option(
        "--negative-prompt", help="Negative prompt, for profiles that take one.", show_default=False)] = None,
    images_per_prompt: Annotated[int | None, typer.Option(
        "--images-per-prompt", help="Images per prompt, 1-64 (default: 1).")] = None,
    output: Annotated[str | None, typer.Option(
        "--output", envvar="GENIMG_OUTPUT",
        help="s3://bucket/prefix, or file:///dir under GENIMG_LOCAL_OUTPUT_ROOT.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Job seed, 0..2**63-1 (default: 0).")] = None,
    image_format: Annotated[str | None, typer.Option(
        "--image-format", envvar="GENIMG_IMAGE_FORMAT", help="png, webp or jpeg (default: png).")] = None,
    quality: Annotated[int | None, typer.Option("--quality", help="1-100 for webp/jpeg (default: 95).")] = None,
    shard_size: Annotated[int | None, typer.Option(
        "--shard-size", envvar="GENIMG_SHARD_SIZE", help="Images per shard, 1-10000 (default: 1000).")] = None,
    sub_batch_size: Annotated[int | None, typer.Option(
        "--sub-batch-size", help="Images per Triton request, 1-256 (default: 64).")] = None,
    upscale: Annotated[bool | None, typer.Option(
        "--upscale/--no-upscale", help="--no-upscale runs the profile's variant without upscaling.",
        show_default=False)] = None,
    priority: Annotated[str | None, typer.Option(
        "--priority", envvar="GENIMG_PRIORITY",
        help="0-9 or low/normal/high; higher runs sooner (default: normal).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="A label for the job.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key",
        help="Submitting the same key again returns the same job (exit 2 if its spec differs).")] = None,
    prompt_column: Annotated[str | None, typer.Option(
        "--prompt-column", help="Field/column of .jsonl/.csv/.parquet prompts (default: prompt).")] = None,
    prompt_format: Annotated[str | None, typer.Option(
        "--prompt-format", help="text, jsonl, csv or parquet (default: from the file suffix).")] = None,
    prompt_chunk_size: Annotated[int | None, typer.Option(
        "--prompt-chunk-size", help="Prompts per stored chunk (default: 1000).")] = None,
    expand: Annotated[bool, typer.Option(
        "--expand", help="Expand prompts: a language model (prompt_expander) writes each image's description; "
                         "implied by any --expand-* option.")] = False,
    expand_template: Annotated[str | None, typer.Option(
        "--expand-template", help="Prompt template: {prompt} is the prompt, {a|b|c} picks one per prompt, "
                                  "__name__ picks a line of WILDCARDS_DIR/name.txt.", show_default=False)] = None,
    expand_model: Annotated[str | None, typer.Option(
        "--expand-model", help="The Triton model that writes descriptions, or 'none' for templates only "
                               "(default: prompt_expander).", show_default=False)] = None,
    expand_instruction: Annotated[str | None, typer.Option(
        "--expand-instruction", help="The language model's instruction, with {text} where the text goes.",
        show_default=False)] = None,
    expand_max_new_tokens: Annotated[int | None, typer.Option(
        "--expand-max-new-tokens", help="Tokens per description, 1-256 (default: 48).", show_default=False)] = None,
    expand_temperature: Annotated[float | None, typer.Option(
        "--expand-temperature", help="0 (greedy) to 2 (default: 0.7).", show_default=False)] = None,
    expand_per: Annotated[str | None, typer.Option(
        "--expand-per", help="prompt (default: the images of a prompt share one expansion) or item.",
        show_default=False)] = None,
    wildcards_dir: Annotated[Path | None, typer.Option(
        "--wildcards-dir", help="Directory of NAME.txt wildcard files (one option a line) the template uses.",
        show_default=False)] = None,
    keep_if: Annotated[str | None, typer.Option("--keep-if", help=KEEP_IF_HELP, show_default=False)] = None,
    regenerate: Annotated[int | None, typer.Option("--regenerate", help=REGENERATE_HELP, show_default=False)] = None,
    dedup: Annotated[str | None, typer.Option("--dedup", help=DEDUP_HELP, show_default=False)] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job to finish (exit 1 if it fails).")] = False,
    timeout_s: TimeoutS = None,
    no_progress: NoProgress = False,
    as_json: JsonOut = False,
    redis_url: RedisUrl = None,
    queue: Queue = None,
    key_prefix: KeyPrefix = None,
) -> None:
    """Submit a dataset job: validate it, store its prompts and spec, enqueue one task per shard.

    Example: genimg submit --prompts ideas.txt --expand --expand-max-new-tokens 32 --output s3://bucket/described

    Example: genimg submit --prompts prompts.txt --images-per-prompt 4 --output s3://bucket/run-7 --seed 1234 --wait

    Example: genimg submit --model terrain --count 300 --param difficulty=1,50,100 --output s3://bucket/terrain

    Example: genimg submit --count 10000 --keep-if 'score >= 0.9' --regenerate 8 --output s3://bucket/digits
    """
    with _exit_codes():
        if prompts_file is not None and prompt:
            raise ValidationError("give --prompts FILE or --prompt TEXT, not both", field="prompts")
        prompts: Any = prompts_file if prompts_file is not None else (list(prompt) if prompt else None)
        int_priority: int | str | None = priority
        if priority is not None and priority.strip().lstrip("-").isdigit():
            int_priority = int(priority)
        params = _params(param, model) if param else None
        given = {"template": expand_template, "instruction": expand_instruction,
                 "max_new_tokens": expand_max_new_tokens, "temperature": expand_temperature, "per": expand_per,
                 "wildcards_dir": str(wildcards_dir) if wildcards_dir is not None else None}
        opts: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if expand_model is not None:
            opts["model"] = None if expand_model.strip().lower() == "none" else expand_model
        expand_opts = opts if expand or opts else None
        with _client(redis_url, queue, key_prefix) as client, _sigterm_unwinds():
            job = client.submit(
                prompts, count=count, model=model, params=params, negative_prompt=negative_prompt,
                images_per_prompt=images_per_prompt, output=output,
                seed=seed, image_format=image_format, quality=quality, shard_size=shard_size,
                sub_batch_size=sub_batch_size, upscale=upscale, priority=int_priority, name=name,
                idempotency_key=idempotency_key, prompt_column=prompt_column, prompt_format=prompt_format,
                prompt_chunk_size=prompt_chunk_size, expand=expand_opts, keep_if=keep_if, regenerate=regenerate,
                dedup=dedup,
            )
            spec = job.spec
            doc: dict[str, Any] = {"job_id": job.job_id, "model": spec.model, "total_items": spec.total_items,
                                   "num_shards": spec.shard_plan().num_shards, "output": spec.output,
                                   "job_prefix": spec.job_prefix}
            if not wait:
                if as_json:
                    _print_json(doc)
                else:
                    typer.echo(job.job_id)
                    _err(f"submitted {spec.total_items:,} images in {doc['num_shards']:,} shards to "
                         f"{spec.job_prefix}")
                return
            st = job.wait(progress=not no_progress and not as_json, timeout_s=timeout_s)
            if as_json:
                _print_json({**doc, "status": st.to_dict()})
            else:
                typer.echo(job.job_id)
                _err(_status_line(st))
    raise typer.Exit(_final_exit(st))


@_guarded
def status(job_id: JobId, output: OutputHint = None, as_json: JsonOut = False, redis_url: RedisUrl = None,
           queue: Queue = None, key_prefix: KeyPrefix = None) -> None:
    """Show a job's state and counts (shards queued/running/done/failed, images done/failed).

    Example: genimg status 3f2a9c0e4b7d4c1a9e8f6d5c4b3a2910 --json
    """
    with _client(redis_url, queue, key_prefix) as client:
        _show(client.job(job_id, output=output).status(), as_json)


def wait(job_id: JobId, output: OutputHint = None, timeout_s: TimeoutS = None, no_progress: NoProgress = False,
         as_json: JsonOut = False, redis_url: RedisUrl = None, queue: Queue = None,
         key_prefix: KeyPrefix = None) -> None:
    """Wait for a job to finish, with a progress bar; exit 0 if it succeeded, 1 if not.

    Example: genimg wait 3f2a9c0e4b7d4c1a9e8f6d5c4b3a2910 --timeout-s 3600
    """
    with _exit_codes():
        with _client(redis_url, queue, key_prefix) as client:
            st = client.job(job_id, output=output).wait(progress=not no_progress and not as_json,
                                                        timeout_s=timeout_s)
        _show(st, as_json)
    raise typer.Exit(_final_exit(st))


@_guarded
def cancel(job_id: JobId, output: OutputHint = None, as_json: JsonOut = False, redis_url: RedisUrl = None,
           queue: Queue = None, key_prefix: KeyPrefix = None) -> None:
    """Cancel a job: no new shard starts; shards already running finish.

    Example: genimg cancel 3f2a9c0e4b7d4c1a9e8f6d5c4b3a2910
    """
    with _client(redis_url, queue, key_prefix) as client:
        _show(client.job(job_id, output=output).cancel(), as_json)


@_guarded
def resume(job_id: JobId, output: OutputHint = None, as_json: JsonOut = False, redis_url: RedisUrl = None,
           queue: Queue = None, key_prefix: KeyPrefix = None) -> None:
    """Re-enqueue every shard without a committed index (after a crash, a Redis loss or a cancel).

    Example: genimg resume 3f2a9c0e4b7d4c1a9e8f6d5c4b3a2910 --output s3://bucket/run-7
    """
    with _client(redis_url, queue, key_prefix) as client:
        job = client.job(job_id, output=output)
        sent = job.resume()
        if as_json:
            _print_json({"job_id": job_id, "enqueued": sent, "status": job.status().to_dict()})
        else:
            typer.echo(f"{job_id}: {sent} shards enqueued")


@_guarded
def manifest(job_id: JobId, out: Annotated[Path, typer.Option("--out", show_default=False,
                                                              help="Local file to write (.parquet, .csv or .jsonl).")],
             output: OutputHint = None, as_json: JsonOut = False, redis_url: RedisUrl = None,
             queue: Queue = None, key_prefix: KeyPrefix = None) -> None:
    """Write a job's manifest (one row per item) to a local file, streamed part by part.

    Example: genimg manifest 3f2a9c0e4b7d4c1a9e8f6d5c4b3a2910 --out manifest.parquet
    """
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".csv", ".jsonl"):
        raise ValidationError(f"must end in .parquet, .csv or .jsonl (got {str(out)!r})", field="out")
    with _client(redis_url, queue, key_prefix) as client:
        rows = _write_batches(client.job(job_id, output=output).iter_manifest(), out)
    if as_json:
        _print_json({"job_id": job_id, "rows": rows, "out": str(out)})
    else:
        _err(f"wrote {rows:,} rows to {out}")


def _write_batches(batches: Any, out: Path) -> int:
    """Write record batches to ``out`` (.parquet, .csv or .jsonl) through a temporary file; returns the rows.

    JSON Lines hold what every JSON reader keeps exactly (:func:`genimg.shards.json_safe`: ``seed`` as a
    decimal string, no nulls).

    Memory holds one batch at a time.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from genimg.shards import json_safe

    tmp = out.with_name(f".{out.name}.tmp")
    rows, writer, suffix = 0, None, out.suffix.lower()
    try:
        with open(tmp, "wb") as f:
            try:
                for batch in batches:
                    if suffix == ".jsonl":
                        f.write("".join(json.dumps(json_safe(row), ensure_ascii=False, default=str) + "\n"
                                        for row in batch.to_pylist()).encode("utf-8"))
                    else:
                        if writer is None:
                            writer = (pq.ParquetWriter(f, batch.schema, compression="zstd") if suffix == ".parquet"
                                      else pacsv.CSVWriter(f, batch.schema))
                        writer.write_batch(batch)
                    rows += batch.num_rows
            finally:
                if writer is not None:
                    writer.close()
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ValidationError(f"cannot write {str(out)!r}: {e.strerror}", field="out") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows


@_guarded
def ls(limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="Most jobs to list.")] = 20,
       as_json: JsonOut = False, redis_url: RedisUrl = None, queue: Queue = None,
       key_prefix: KeyPrefix = None) -> None:
    """List recent jobs, newest first.

    Example: genimg ls --limit 5 --json
    """
    with _client(redis_url, queue, key_prefix) as client:
        statuses = [job.status() for job in client.jobs(limit)]
    if as_json:
        _print_json([st.to_dict() for st in statuses])
    else:
        for st in statuses:
            typer.echo(_status_line(st))


@_guarded
def plan(
    model: Annotated[str, typer.Option("--model", help="A model profile (genimg models list).", show_default=False)],
    count: Annotated[int, typer.Option("--count", min=1, help="Images the job makes.", show_default=False)],
    gpus_max: Annotated[int | None, typer.Option(
        "--gpus-max", min=1, help="Most GPU pods (default: maxReplicaCount in deploy/k8s/overlays/gpu).")] = None,
    images_per_s: Annotated[float | None, typer.Option(
        "--images-per-s", min=0.001, help="Images/s of one GPU pod (a published or measured ceiling); default "
        "the profile's measured figure in benchmarks/results/throughput.json.")] = None,
    image_bytes: Annotated[float | None, typer.Option(
        "--image-bytes", min=1, help="Mean bytes of one encoded image (default: measured).")] = None,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, max=10_000, help="Images per shard.")] = 1_000,
    node_start_s: Annotated[float, typer.Option(
        "--node-start-s", min=0, help="Seconds from asking for a GPU pod to its first shard (node, image pull, "
        "engines, Triton).")] = 420.0,
    node_scale_down_s: Annotated[float, typer.Option(
        "--node-scale-down-s", min=0, help="Seconds an empty GPU node stays (cluster autoscaler).")] = 600.0,
    local_workers: Annotated[int | None, typer.Option(
        "--local-workers", min=1, help="Plan for the local stack instead: this many workers sharing --cpus, "
        "no autoscaling.")] = None,
    cpus: Annotated[float | None, typer.Option("--cpus", min=0.1, help="CPUs of the local stack "
                                                                          "(default: this machine's).")] = None,
    as_json: JsonOut = False,
) -> None:
    """Estimate a job's wall time, GPU-hours, Redis and S3 request rates and output bytes before running it.

    Example: genimg plan --model txt2img --count 100000000 --gpus-max 16 --images-per-s 900
    """
    import os
    from dataclasses import replace

    from genimg.plan import Keda, Load, Profile, keda_from_deploy, measured_profile, plan_job
    from genimg.profiles import load_profiles
    from genimg.shardplan import manifest_part_shards_for

    profiles = load_profiles()
    if model not in profiles.profiles:
        raise ValidationError(f"no profile named {model!r} (genimg models list)", field="model")
    text = profiles.profiles[model].task == "text"
    measured = measured_profile(model)
    if images_per_s is None and measured is None:
        raise ValidationError(f"no measured throughput for {model!r}: give --images-per-s", field="images_per_s")
    prof = measured or Profile(images_per_s=float(images_per_s or 1.0), text=text)
    changes: dict[str, Any] = {"text": text}
    if images_per_s:
        changes.update(images_per_s=images_per_s, cpu_s_per_image=None, source="--images-per-s")
    if image_bytes:
        changes["image_bytes"] = image_bytes
    prof = replace(prof, **changes)
    if local_workers:
        keda = Keda(max_pods=local_workers, concurrency=1, node_start_s=0.0, node_scale_down_s=0.0,
                    source="local stack: workers of concurrency 1, no autoscaling")
        result = plan_job(Load(model, count, shard_size, prof), keda, part_shards=manifest_part_shards_for(shard_size),
                          cpus=cpus or float(os.cpu_count() or 1), autoscale=False)
    else:
        keda = replace(keda_from_deploy(), node_start_s=node_start_s, node_scale_down_s=node_scale_down_s)
        if gpus_max:
            keda = replace(keda, max_pods=gpus_max)
        result = plan_job(Load(model, count, shard_size, replace(prof, cpu_s_per_image=None)), keda,
                          part_shards=manifest_part_shards_for(shard_size))
    if as_json:
        _print_json(result.to_dict())
        return
    r = result
    lines = [
        f"job: {count:,} images of {model} in {r.shards:,} shards of {shard_size:,}; {r.pods_peak} "
        f"{'workers' if local_workers else 'GPU pods'} at most",
        f"throughput: {prof.images_per_s:,.1f} images/s per {'worker' if local_workers else 'pod'} ({prof.source}); "
        f"steady {r.images_per_s_steady:,.1f} images/s",
        f"wall time: {_hms(r.wall_s)} (submit {_hms(r.submit_s)}, first shard at {_hms(r.first_image_s)}, "
        f"last shard at {_hms(r.work_end_s)}, finalise {r.finalise_s:.0f} s); a shard ~{r.shard_seconds:.0f} s",
        f"GPU-hours: {r.gpu_hours_billed:,.1f} billed (node start-up, tail and scale-in included), "
        f"{r.gpu_hours_busy:,.1f} busy" if not local_workers else "GPU-hours: none (local stack)",
        f"Redis: {r.redis_commands_per_s:,.0f} commands/s, "
        f"peak {r.redis_peak_bytes / 2**20:,.0f} MiB (queue + done-hash)",
        "S3: " + ", ".join(f"{k} {v:,.1f}/s" for k, v in r.s3_requests_per_s.items()),
        f"output: {r.output_bytes / 2**30:,.2f} GiB (tars, indexes, manifest)",
        f"autoscaling: {keda.source}",
        *(f"warning: {w}" for w in r.warnings),
    ]
    typer.echo("\n".join(lines))


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


COMMANDS: tuple[Callable[..., Any], ...] = (submit, status, wait, cancel, resume, manifest, ls, plan)


def register(app: typer.Typer) -> None:
    """Add the producer's commands to the root ``genimg`` app."""
    for fn in COMMANDS:
        app.command(name=fn.__name__)(fn)
