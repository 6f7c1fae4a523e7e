"""``genimg local up/down/status/env``: the CLI of :mod:`genimg.local` (the local stack).

Example::

    genimg local up --workers 2
    eval "$(genimg local env)"
    genimg local status
    genimg local down
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from genimg.errors import GenImgError
from genimg.local import DEFAULT_BUCKET, DEFAULT_WORKERS, TRITON_START_TIMEOUT_S, LocalStack, env_lines

app = typer.Typer(help="Run genimg's whole stack on this machine: Redis, Triton (cpu), an S3 API, workers.\n\n"
                  "Example: genimg local up --workers 2 && eval \"$(genimg local env)\"", no_args_is_help=True)

_DirOpt = typer.Option(None, "--dir", envvar="GENIMG_LOCAL_DIR", help="State directory (default ./.genimg).")


def _say(line: str) -> None:
    typer.echo(f"genimg local: {line}", err=True)


def _fail(e: GenImgError) -> typer.Exit:
    typer.echo(f"genimg local: error: {e}", err=True)
    return typer.Exit(1)


@app.command()
def up(
    workers: int = typer.Option(DEFAULT_WORKERS, "--workers", min=0, help="Worker processes (one pool process each)."),
    repo: Path = typer.Option(None, "--repo", envvar="GENIMG_TRITON_REPO",
                              help="cpu model repository (default .cache/genimg/model_repository; built if missing)."),
    bucket: str = typer.Option(DEFAULT_BUCKET, "--bucket", help="Bucket the jobs write to (created if missing)."),
    timeout_s: float = typer.Option(TRITON_START_TIMEOUT_S, "--timeout-s", help="Seconds for Triton's models to load."),
    directory: Path = _DirOpt,
) -> None:
    """Start the stack (a no-op when it is already up) and wait until every part is ready.

    Example: genimg local up --workers 2
    """
    stack = LocalStack(directory)
    try:
        state, _ = stack.up(workers, repo=repo, bucket=bucket, triton_timeout_s=timeout_s, say=_say)
    except GenImgError as e:
        raise _fail(e) from None
    _say(f"up; logs in {Path(state.directory) / 'logs'}; for a shell: eval \"$(genimg local env)\"")


@app.command()
def down(directory: Path = _DirOpt) -> None:
    """Stop exactly what `genimg local up` started (external Redis/S3/Triton are left alone).

    Example: genimg local down
    """
    try:
        LocalStack(directory).down(say=_say)
    except GenImgError as e:
        raise _fail(e) from None


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
           directory: Path = _DirOpt) -> None:
    """Show each component: running/stopped/external, pid, address and log file. Exit 0 if up, 1 if not.

    Example: genimg local status --json
    """
    try:
        doc = LocalStack(directory).status()
    except GenImgError as e:
        raise _fail(e) from None
    if as_json:
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
    elif not doc["components"]:
        typer.echo(f"no local stack ({doc['state_file']})")
    else:
        typer.echo(f"local stack {'up' if doc['up'] else 'DEGRADED'} since {doc['created_at']} ({doc['state_file']})")
        for row in doc["components"]:
            typer.echo(f"  {row['name']:<13} {row['state']:<8} pid {row['pid'] or '-':<8} {row['address'] or '-'}"
                       f"{'  log ' + row['log'] if row['log'] else ''}")
    raise typer.Exit(0 if doc["up"] else 1)


@app.command()
def env(directory: Path = _DirOpt) -> None:
    """Print `export GENIMG_...=` lines that point genimg at the stack.

    Example: eval "$(genimg local env)" && genimg submit --prompt "a 7" --wait
    """
    try:
        state = LocalStack(directory).load()
    except GenImgError as e:
        raise _fail(e) from None
    if state is None:
        typer.echo("genimg local: no local stack is up (genimg local up)", err=True)
        raise typer.Exit(1)
    env_ = dict(state.env)
    if state.info.get("redis_url_from_env"):
        env_.pop("GENIMG_REDIS_URL", None)
        typer.echo("# GENIMG_REDIS_URL: keep the one in your environment (it holds a password)")
    for line in env_lines(env_):
        typer.echo(line)
