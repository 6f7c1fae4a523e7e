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
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from genimg.settings import WorkerSettings

log = logging.getLogger(__name__)


def validate_settings() -> WorkerSettings:
    """Every ``GENIMG_*`` value the worker (main process and pool children) reads, checked at once.

    Worker settings and their timing (case C1), the Triton client, S3 (files
    that must exist, credentials that must pair), job-spec settings, and
    variables genimg no longer reads.

    Returns:
        The :class:`~genimg.settings.WorkerSettings`.

    Raises:
        ConfigError: one line naming the first invalid variable and the allowed values.
    """
    from genimg.errors import ConfigError
    from genimg.settings import (
        SpecSettings,
        StorageSettings,
        TritonSettings,
        WorkerSettings,
        check_retired_variables,
        check_spec_settings,
        check_timing,
        load_settings,
    )
    from genimg.stores.s3_client import check_storage

    check_retired_variables()
    s = load_settings(WorkerSettings)
    if s.check_timing:
        check_timing(s)
    TritonSettings.checked()
    check_storage(StorageSettings.checked())
    check_spec_settings(SpecSettings.checked())
    from genimg.errors import ValidationError
    from genimg.profiles import load_profiles

    try:
        profiles = load_profiles()
    except ValidationError as e:
        raise ConfigError(f"invalid GENIMG_PROFILES_DIR: {str(e).removeprefix('profiles_dir: ')}; allowed: a "
                          "directory of *.toml model profiles") from None
    if not profiles.profiles:
        raise ConfigError(f"invalid GENIMG_PROFILES_DIR={str(profiles.directory)!r}: no valid profile in it "
                          f"(broken: {', '.join(profiles.errors) or 'none'}); allowed: a directory of *.toml profiles")
    return s


def _probe() -> int:
    """Liveness/readiness: Redis answers PING and Triton's ensembles are ready. Returns 0 or 1."""
    import redis

    from genimg.errors import GenImgError
    from genimg.settings import TritonSettings
    from genimg.triton.client import InferenceClient
    from workers.app import SETTINGS as s
    from workers.app import required_models

    try:
        redis.Redis.from_url(s.redis_url.get_secret_value(), socket_connect_timeout=3, socket_timeout=3).ping()
        with InferenceClient.from_settings(TritonSettings.from_env()) as client:
            client.wait_ready(required_models(), timeout_s=3)
    except (redis.RedisError, GenImgError) as e:
        typer.echo(f"worker check failed: {type(e).__name__}: {e}", err=True)
        return 1
    typer.echo("worker check ok")
    return 0


def worker(
    concurrency: int = typer.Option(None, help="Pool processes [env GENIMG_CONCURRENCY]."),
    metrics_port: int = typer.Option(None, help="Port of /metrics, 0 = none [env GENIMG_METRICS_PORT]."),
    max_tasks_per_child: int = typer.Option(
        None, help="Recycle a child after N shards [env GENIMG_MAX_TASKS_PER_CHILD]."),
    hostname: str = typer.Option(None, help="Celery node name (default genimg@HOST-PID)."),
    check: bool = typer.Option(False, "--check", help="Probe Redis and Triton, exit 0 (ok) or 1."),
) -> None:
    """Consume shard tasks until SIGTERM (warm shutdown: the running shard finishes first).

    Every ``GENIMG_*`` setting is checked first: an invalid one exits 2 with one
    line naming it, before anything is consumed. The worker then takes shards
    only while Triton reports every model it needs as ready (:mod:`workers.gate`).
    """
    overrides = {k: v for k, v in {"concurrency": concurrency, "metrics_port": metrics_port,
                                   "max_tasks_per_child": max_tasks_per_child}.items() if v is not None}
    for k, v in overrides.items():
        os.environ[f"GENIMG_{k.upper()}"] = str(v)
    from genimg.errors import ConfigError

    try:
        s = validate_settings()
    except ConfigError as e:
        typer.echo(f"genimg worker: refusing to start: {e}", err=True)
        raise typer.Exit(2) from None
    if check:
        raise typer.Exit(_probe())
    if s.metrics_port:
        from genimg import metrics

        try:
            mdir = s.metrics_dir or tempfile.mkdtemp(prefix="genimg-metrics-")
            metrics.prepare_multiproc_dir(mdir)
        except OSError as e:
            typer.echo(f"genimg worker: refusing to start: invalid GENIMG_METRICS_DIR={s.metrics_dir!r}: allowed "
                       f"a directory this user can create and empty ({e.strerror})", err=True)
            raise typer.Exit(2) from None
        from genimg.metrics_server import start_metrics_server

        try:
            start_metrics_server(s.metrics_port)
        except OSError as e:
            typer.echo(f"genimg worker: cannot serve /metrics on GENIMG_METRICS_PORT={s.metrics_port}: "
                       f"{e.strerror}", err=True)
            raise typer.Exit(3) from None
    from celery.signals import worker_init

    from workers.app import app

    name = hostname or f"genimg@{socket.gethostname()}-{os.getpid()}"
    argv = ["worker", "--loglevel", logging.getLevelName(logging.getLogger().level), "--concurrency",
            str(s.concurrency), "-Q", s.queue, "--prefetch-multiplier", "1", "-O", "fair", "-n", name,
            "--without-gossip", "--without-mingle", "--pool", "prefork"]
    if s.max_tasks_per_child:
        argv += ["--max-tasks-per-child", str(s.max_tasks_per_child)]
    sys.stdout.flush()
    controllers = []
    worker_init.connect(lambda sender=None, **_: controllers.append(sender), weak=False)
    app.worker_main(argv=argv)
    # worker_main drops Celery's exit code: a worker that died of an unrecoverable error exited 0.
    raise typer.Exit(next((c.exitcode for c in controllers if c is not None and c.exitcode), 0))
