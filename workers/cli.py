"""``genimg worker``: start a Celery worker, or probe one (``--check``).

Example::

    GENIMG_REDIS_URL=redis://127.0.0.1:6379/0 GENIMG_TRITON_URL=127.0.0.1:8001 \\
        genimg worker --concurrency 2 --metrics-port 9101
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile

import typer

log = logging.getLogger(__name__)


def _probe() -> int:
    """Liveness/readiness: Redis answers PING and Triton's ensembles are ready. Returns 0 or 1."""
    import redis

    from genimg.errors import GenImgError
    from genimg.settings import TritonSettings
    from genimg.triton.client import InferenceClient
    from workers.config import WorkerSettings

    s = WorkerSettings()
    try:
        redis.Redis.from_url(s.redis_url.get_secret_value(), socket_connect_timeout=3, socket_timeout=3).ping()
        with InferenceClient.from_settings(TritonSettings.from_env()) as client:
            client.wait_ready(["txt2img", "noise2img"], timeout_s=3)
    except (redis.RedisError, GenImgError) as e:
        typer.echo(f"worker check failed: {type(e).__name__}: {e}", err=True)
        return 1
    typer.echo("worker check ok")
    return 0


def worker(
    concurrency: int = typer.Option(None, help="Pool processes [env GENIMG_CONCURRENCY]."),
    metrics_port: int = typer.Option(None, help="Port of /metrics, 0 = none [env GENIMG_METRICS_PORT]."),
    max_tasks_per_child: int = typer.Option(None, help="Recycle a child after N shards [env GENIMG_MAX_TASKS_PER_CHILD]."),
    hostname: str = typer.Option(None, help="Celery node name (default genimg@HOST-PID)."),
    check: bool = typer.Option(False, "--check", help="Probe Redis and Triton, exit 0 (ok) or 1."),
) -> None:
    """Consume shard tasks until SIGTERM (warm shutdown: the running shard finishes first)."""
    if check:
        raise typer.Exit(_probe())
    overrides = {k: v for k, v in {"concurrency": concurrency, "metrics_port": metrics_port,
                                   "max_tasks_per_child": max_tasks_per_child}.items() if v is not None}
    for k, v in overrides.items():
        os.environ[f"GENIMG_{k.upper()}"] = str(v)
    from pydantic import ValidationError

    from genimg.errors import ConfigError
    from genimg.settings import TritonSettings
    from workers.config import WorkerSettings, check_timing

    try:  # a Triton setting is otherwise read only by the first shard, long after a rollout looked healthy
        TritonSettings.from_env()
    except ValidationError as e:
        bad = "; ".join(f"GENIMG_{'_'.join(map(str, err['loc'])).upper()}: {err['msg']}" for err in e.errors())
        typer.echo(f"genimg worker: refusing to start: {bad}", err=True)
        raise typer.Exit(2) from None
    s = WorkerSettings()
    if s.check_timing:
        try:
            check_timing(s)
        except ConfigError as e:
            typer.echo(f"genimg worker: refusing to start: {e}", err=True)
            raise typer.Exit(2) from None
    if s.metrics_port:
        from genimg import metrics

        mdir = s.metrics_dir or tempfile.mkdtemp(prefix="genimg-metrics-")
        metrics.prepare_multiproc_dir(mdir)
        from genimg.metrics_server import start_metrics_server

        start_metrics_server(s.metrics_port)
    from workers.app import app

    name = hostname or f"genimg@{socket.gethostname()}-{os.getpid()}"
    argv = ["worker", "--loglevel", logging.getLevelName(logging.getLogger().level), "--concurrency",
            str(s.concurrency), "-Q", s.queue, "--prefetch-multiplier", "1", "-O", "fair", "-n", name,
            "--without-gossip", "--without-mingle", "--pool", "prefork"]
    if s.max_tasks_per_child:
        argv += ["--max-tasks-per-child", str(s.max_tasks_per_child)]
    sys.stdout.flush()
    app.worker_main(argv=argv)
