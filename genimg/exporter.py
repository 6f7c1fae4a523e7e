"""``genimg exporter``: the queue backlog as Prometheus metrics, the signal the autoscaler scales on.

Every scrape reads Redis afresh (:func:`genimg.queue.backlog`); nothing is
cached, so a scrape never serves an old number. When Redis does not answer,
the scrape says so with ``genimg_backlog_up 0`` and carries no backlog sample
at all (an autoscaler then holds its last decision instead of scaling to zero).

| metric | type | labels | unit |
| --- | --- | --- | --- |
| ``genimg_backlog_shards`` | gauge | queue, kind (``waiting``, ``reserved``, ``total``) | shards |
| ``genimg_backlog_up`` | gauge | — | 1 when Redis answered this scrape, else 0 |

``waiting`` counts the task messages in the queue's Redis lists over every
priority level; ``reserved`` the messages delivered to a worker and not yet
acknowledged (prefetched, running, or waiting on a retry countdown: genimg
acks late, so a running shard stays reserved until it has committed); ``total``
is their sum. One exporter per Redis broker is enough; it is cheap (one LLEN per
priority level and one HSCAN of kombu's ``unacked`` hash per queue).

Example::

    GENIMG_REDIS_URL=redis://127.0.0.1:6379/0 genimg exporter --port 9180 --queue genimg
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Annotated, Any

import pydantic
import redis
import typer
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler
from pydantic import Field

from genimg.errors import QueueUnavailableError
from genimg.queue import backlog
from genimg.settings import RedisSettings, settings_error

log = logging.getLogger(__name__)

DEFAULT_PORT = 9180
"""TCP port ``genimg exporter`` listens on unless told otherwise."""


class ExporterSettings(RedisSettings):
    """Settings of ``genimg exporter`` (``GENIMG_*`` variables; the CLI options override them).

    ``redis_url`` is the Celery broker (the workers' ``GENIMG_REDIS_URL``), ``queue`` the workers' ``GENIMG_QUEUE``.
    """

    broker_global_keyprefix: str = Field(default="", max_length=64)
    """kombu's ``global_keyprefix`` transport option, if the broker uses one (every kombu key starts with it)."""
    exporter_port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    exporter_addr: str = "0.0.0.0"
    redis_timeout_s: float = Field(default=3.0, gt=0, le=60)
    """Socket timeout of each Redis call; keep it well below Prometheus's scrape timeout (10 s by default)."""


@dataclass(frozen=True)
class BacklogCollector:
    """A prometheus_client collector that reads the backlog of ``queues`` from Redis on each collect.

    Args:
        client: Redis client of the broker database.
        queues: Celery queue names.
        global_prefix: kombu's ``global_keyprefix``, if any.
    """

    client: redis.Redis
    queues: Sequence[str]
    global_prefix: str = ""

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration; collect() reads Redis only when scraped

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("genimg_backlog_up", "1 when Redis answered this scrape (backlog samples "
                               "follow), 0 when it did not (no backlog sample is served).")
        try:
            readings = [backlog(self.client, q, self.global_prefix) for q in self.queues]
        except QueueUnavailableError as e:
            log.warning("backlog scrape without data: %s", e)
            up.add_metric([], 0)
            yield up
            return
        shards = GaugeMetricFamily("genimg_backlog_shards", "Shards of a queue: waiting in Redis, reserved "
                                   "(delivered, not yet acknowledged: prefetched or running), and total.",
                                   labels=["queue", "kind"])
        for b in readings:
            shards.add_metric([b.queue, "waiting"], b.waiting)
            shards.add_metric([b.queue, "reserved"], b.reserved)
            shards.add_metric([b.queue, "total"], b.total)
        yield shards
        up.add_metric([], 1)
        yield up


def redis_client(url: str, timeout_s: float) -> redis.Redis:
    """A broker client that fails fast: short timeouts and one reconnect, so a scrape never hangs."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 1), health_check_interval=30)


def make_registry(client: redis.Redis, queues: Sequence[str], global_prefix: str = "") -> CollectorRegistry:
    """A registry holding only the backlog collector (no process or platform metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BacklogCollector(client, tuple(queues), global_prefix))
    return registry


def start_exporter(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread; returns the server."""
    handler = MetricsHandler.factory(registry)
    server = ThreadingHTTPServer((addr, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="exporter", daemon=True).start()
    return server


def exporter(
    port: Annotated[int | None, typer.Option(
        "--port", envvar="GENIMG_EXPORTER_PORT", show_default=False,
        help=f"Listen port (default {DEFAULT_PORT}).")] = None,
    addr: Annotated[str | None, typer.Option(
        "--addr", envvar="GENIMG_EXPORTER_ADDR", show_default=False,
        help="Listen address (default 0.0.0.0).")] = None,
    queue: Annotated[list[str] | None, typer.Option(
        "--queue", envvar="GENIMG_QUEUE", show_default=False,
        help="Celery queue, as the workers' GENIMG_QUEUE; repeat for several (default genimg).")] = None,
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", envvar="GENIMG_REDIS_URL", show_default=False,
        help="Broker URL, redis:// or rediss:// (default redis://127.0.0.1:6379/0); passwords are never "
             "printed.")] = None,
    global_keyprefix: Annotated[str | None, typer.Option(
        "--global-keyprefix", envvar="GENIMG_BROKER_GLOBAL_KEYPREFIX", show_default=False,
        help="kombu's global_keyprefix transport option, if the broker uses one.")] = None,
) -> None:
    """Serve the queue backlog on /metrics for Prometheus and the autoscaler, until SIGTERM.

    Example: genimg exporter --port 9180 --queue genimg
    """
    from genimg.redaction import redact_url, register_url_secret

    overrides: dict[str, Any] = {k: v for k, v in {"exporter_port": port, "exporter_addr": addr, "redis_url": redis_url,
                                   "broker_global_keyprefix": global_keyprefix}.items() if v is not None}
    try:
        s = ExporterSettings(**overrides)
        queues = [ExporterSettings(queue=q).queue for q in queue] if queue else [s.queue]
    except pydantic.ValidationError as e:
        given = dict(overrides)
        if queue:
            given["queue"] = " ".join(queue)
        typer.echo(f"genimg exporter: refusing to start: {settings_error(ExporterSettings, e, given)}", err=True)
        raise typer.Exit(2) from None
    url = s.redis_url.get_secret_value()
    register_url_secret(url)
    registry = make_registry(redis_client(url, s.redis_timeout_s), queues, s.broker_global_keyprefix)
    try:
        server = start_exporter(registry, s.exporter_port, s.exporter_addr)
    except OSError as e:
        typer.echo(f"genimg exporter: cannot listen on {s.exporter_addr}:{s.exporter_port}: {e}", err=True)
        raise typer.Exit(3) from None
    log.info("genimg exporter serving http://%s:%d/metrics for queue(s) %s on %s", s.exporter_addr,
             server.server_address[1], ",".join(queues), redact_url(url))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    log.info("genimg exporter stopped")
