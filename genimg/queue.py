"""The Celery queue on Redis: its configuration, the shard messages, priorities, the backlog signal, and the one
translator of Redis errors.

Configuration: :func:`celery_config` is the one Celery configuration (JSON only,
acks late, prefetch 1, kombu's priority steps); the workers run with it and the
producer and reconciler send with it (:func:`producer_app`).

Messages: sent by the producer and the reconciler, read back from Redis by the
reconciler. A shard's message is the Celery task ``genimg.generate_shard`` with JSON
positional arguments ``[job_id, shard_index]`` on the queue ``GENIMG_QUEUE``,
with the job's priority (kombu's priority steps, below).

kombu's Redis transport stores a waiting message in one of the queue's lists
as a JSON document (``{"body": …, "headers": …, "properties": …}``, the body
base64-encoded JSON ``[args, kwargs, embed]``) and a delivered, unacknowledged
one in the ``unacked`` hash as ``[message, exchange, routing_key]``;
:func:`shard_of_message` and :func:`shard_of_unacked` read the
``(job_id, shard)`` out of either.

Priorities: one Celery queue (``genimg`` by default) with kombu's Redis
priority emulation (``priority_steps`` :data:`PRIORITY_STEPS`,
``queue_order_strategy="priority"``). kombu then keeps one Redis list per
step and always pops the highest-priority non-empty list first; a queue per
priority level would instead be polled round-robin by kombu, which lets low
priority work overtake high. Celery's Redis priorities run 0 (highest) to 9;
genimg's ``priority`` (0 lowest … 9 highest) is mapped by :func:`celery_priority`.

Redis errors are translated to :class:`~genimg.errors.QueueUnavailableError`
by one translator, :func:`redis_errors` (the job's state, :mod:`genimg.jobs`,
the backlog and the producer all use it). The keys of a job's state are
:class:`genimg.jobs.Keys`.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import redis

from genimg.errors import QueueUnavailableError
from genimg.settings import WorkerSettings

PRIORITY_STEPS = [0, 3, 6, 9]
"""kombu Redis priority steps (Celery priority values; 0 is served first)."""
KOMBU_SEP = "\x06\x16"
"""kombu's separator between a queue name and its priority step."""
UNACKED_KEY = "unacked"
"""kombu's hash of delivered-but-unacknowledged messages (acks late: reserved or running)."""
LRANGE_PAGE = 1_000
"""Queue entries read per ``LRANGE`` (:func:`queued_shards`)."""


# --------------------------------------------------------------------------- Celery configuration


def verified_tls_url(url: str) -> str:
    """``url``, with ``ssl_cert_reqs=required`` added to a ``rediss://`` URL that does not say.

    kombu reads a bare ``rediss://`` URL as "TLS without checking the server's
    certificate" (``CERT_NONE``), while redis-py checks it; genimg checks it
    everywhere unless the URL explicitly says ``ssl_cert_reqs=none``.
    """
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    if parts.scheme != "rediss" or "ssl_cert_reqs" in parse_qs(parts.query):
        return url
    return url + ("&" if parts.query else ("" if url.endswith("?") else "?")) + "ssl_cert_reqs=required"


def celery_config(s: WorkerSettings) -> dict[str, Any]:
    """The Celery configuration genimg runs with (JSON only, acks late, prefetch 1)."""
    url = verified_tls_url(s.redis_url.get_secret_value())
    transport = {
        "visibility_timeout": s.visibility_timeout_s,
        "unacked_restore_interval": s.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,
        "priority_steps": PRIORITY_STEPS,
        "queue_order_strategy": "priority",
        "socket_timeout": 30,
        "socket_connect_timeout": 10,
        "retry_on_timeout": True,
        "health_check_interval": 10,
    }
    return {
        "broker_url": url,
        # No result backend: progress lives in genimg's own Redis records (genimg.jobs) and
        # nothing reads Celery results. With one, Celery writes a task's state to Redis while
        # it handles a lost broker connection; when Redis is restarting that write raises
        # and the worker exits (celery 5.6, seen in tests/chaos).
        "result_backend": None,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": s.task_hard_time_limit_s,
        "task_soft_time_limit": s.task_soft_time_limit_s,
        "task_default_queue": s.queue,
        "task_default_priority": 4,
        "task_queue_max_priority": 9,
        "task_track_started": False,
        "result_expires": 24 * 3600,
        "worker_max_tasks_per_child": s.max_tasks_per_child or None,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": False,
    }


# --------------------------------------------------------------------------- shard messages


TASK_NAME = "genimg.generate_shard"
"""Celery task name of one shard (positional JSON args ``[job_id, shard_index]``)."""
ENQUEUE_BATCH = 1_000
"""Task messages per Redis pipeline when enqueueing."""


def producer_app(settings: WorkerSettings, name: str = "genimg-producer") -> Any:
    """A Celery app that only sends shard messages (the workers' configuration, :func:`celery_config`).

    Args:
        settings: :class:`~genimg.settings.WorkerSettings` (broker URL, queue, timing).
        name: the app's name.
    """
    from celery import Celery

    config = celery_config(settings)
    # kombu pipelines batched publishes only when redis-py will not retry a
    # pipeline on its own; a sender needs no such retry (resume re-sends).
    config["broker_transport_options"] = {**config["broker_transport_options"], "retry_on_timeout": False}
    app = Celery(name, set_as_current=False)
    app.conf.update(config)
    return app


def send_shards(app: Any, queue: str, job_id: str, celery_priority: int, shards: Iterable[int]) -> int:
    """Send one task message per shard through one broker connection, in pipelined batches.

    The queue's binding is declared with the first message.

    Returns:
        The number of messages sent.

    Raises:
        kombu.exceptions.OperationalError, KombuError, redis.RedisError, OSError: the broker failed
            (the messages before it were sent).
    """
    sent = 0
    with app.producer_or_acquire() as producer:
        batch = producer.batch(ENQUEUE_BATCH) if hasattr(producer, "batch") else nullcontext()
        with batch:
            for shard in shards:
                app.send_task(TASK_NAME, args=[job_id, int(shard)], queue=queue, priority=celery_priority,
                              producer=producer, ignore_result=True, declare=None if sent == 0 else [])
                sent += 1
    return sent


def queued_shards(client: redis.Redis, queue: str, wanted: set[str]) -> dict[str, set[int]]:
    """Shards of ``wanted`` jobs that have a message waiting (any priority list of ``queue``) or unacknowledged.

    Raises:
        QueueUnavailableError: Redis is unreachable.
    """
    present: dict[str, set[int]] = defaultdict(set)
    with redis_errors(f"reading the messages of queue {queue}"):
        for name in priority_lists(queue):
            start = 0
            while True:
                page = client.lrange(name, start, start + LRANGE_PAGE - 1)
                for raw in page:
                    found = shard_of_waiting(raw)
                    if found is not None and found[0] in wanted:
                        present[found[0]].add(found[1])
                if len(page) < LRANGE_PAGE:
                    break
                start += LRANGE_PAGE  # pushes at the head shift entries right: re-read, never skipped
        for _, raw in client.hscan_iter(UNACKED_KEY, count=500):
            found = shard_of_unacked(raw, queue)
            if found is not None and found[0] in wanted:
                present[found[0]].add(found[1])
    return present


def shard_of_message(message: Any) -> tuple[str, int] | None:
    """``(job_id, shard)`` of one kombu message document (a dict), or ``None`` if it is not a shard task."""
    try:
        headers = message.get("headers") or {}
        if headers.get("task") != TASK_NAME:
            return None
        body = message["body"]
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        job_id, shard = args[0], args[1]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return None
    if not isinstance(job_id, str) or type(shard) is not int:
        return None
    return job_id, shard


def shard_of_waiting(raw: bytes | str) -> tuple[str, int] | None:
    """``(job_id, shard)`` of one entry of a queue list, or ``None``."""
    try:
        return shard_of_message(json.loads(raw))
    except (TypeError, ValueError):
        return None


def shard_of_unacked(raw: bytes | str, queue: str) -> tuple[str, int] | None:
    """``(job_id, shard)`` of one value of kombu's ``unacked`` hash routed to ``queue``, or ``None``."""
    try:
        message, _, routing_key = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if routing_key != queue:
        return None
    return shard_of_message(message)


# --------------------------------------------------------------------------- Redis errors, priorities, backlog


def describe_redis_error(e: BaseException) -> str:
    """``"AuthenticationError: invalid username-password pair …"``: an error's type and Redis' own words.

    For error messages shown to users. The text goes through
    :data:`genimg.redaction.REDACTION` (registered passwords are replaced);
    a refused password or missing AUTH gets a hint naming the setting.
    """
    from genimg.redaction import REDACTION

    text = REDACTION.redact(" ".join(str(e).split())[:300])
    out = f"{type(e).__name__}: {text}" if text else type(e).__name__
    lowered = out.lower()
    if "authentication" in lowered or "password" in lowered or "noauth" in lowered:
        out += " (check the password in GENIMG_REDIS_URL)"
    return out


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate a redis-py error raised in the block into :class:`QueueUnavailableError` (``raise … from e``).

    The message reads ``Redis unavailable during {what}: {type}: {Redis' words}``
    (:func:`describe_redis_error`: no password ever shows).

    Raises:
        QueueUnavailableError: the block raised a ``redis.RedisError``.
    """
    try:
        yield
    except redis.RedisError as e:
        raise QueueUnavailableError(f"Redis unavailable during {what}: {describe_redis_error(e)}") from e


def celery_priority(priority: int) -> int:
    """Map genimg priority 0 (lowest) … 9 (highest) to Celery's Redis priority 9 … 0."""
    if not 0 <= priority <= 9:
        raise ValueError(f"priority must be 0..9, got {priority}")
    return 9 - priority


def priority_lists(queue: str) -> list[str]:
    """The Redis list names kombu uses for ``queue``, one per priority step."""
    return [queue if step == 0 else f"{queue}{KOMBU_SEP}{step}" for step in PRIORITY_STEPS]


@dataclass(frozen=True)
class Backlog:
    """Shards of one queue: waiting in Redis, and delivered but not acknowledged (reserved or running)."""

    queue: str
    waiting: int
    reserved: int

    @property
    def total(self) -> int:
        return self.waiting + self.reserved


def backlog(client: redis.Redis, queue: str = "genimg", global_prefix: str = "") -> Backlog:
    """Count ``queue``'s backlog over every priority level.

    Reserved counts kombu's unacked entries routed to ``queue``; with acks late
    a running shard stays there until it finishes, so the total never reads 0
    while a shard is still running.

    Args:
        client: Redis client of the broker database.
        queue: Celery queue name.
        global_prefix: kombu's ``global_keyprefix`` transport option, if any.

    Raises:
        QueueUnavailableError: Redis is unreachable.
    """
    with redis_errors(f"reading the backlog of queue {queue}"):
        pipe = client.pipeline(transaction=False)
        for name in priority_lists(queue):
            pipe.llen(global_prefix + name)
        waiting = sum(pipe.execute())
        reserved = 0
        for _, raw in client.hscan_iter(global_prefix + UNACKED_KEY, count=500):
            try:
                _, _, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            reserved += routing_key == queue
    return Backlog(queue=queue, waiting=int(waiting), reserved=int(reserved))
