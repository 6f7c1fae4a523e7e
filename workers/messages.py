"""Shard task messages: sending them (producer and reconciler) and reading them back from Redis.

A shard's message is the Celery task ``genimg.generate_shard`` with JSON
positional arguments ``[job_id, shard_index]`` on the queue ``GENIMG_QUEUE``,
with the job's priority (kombu's priority steps, :mod:`genimg.queue`).

kombu's Redis transport stores a waiting message in one of the queue's lists
as a JSON document (``{"body": …, "headers": …, "properties": …}``, the body
base64-encoded JSON ``[args, kwargs, embed]``) and a delivered, unacknowledged
one in the ``unacked`` hash as ``[message, exchange, routing_key]``;
:func:`shard_of_message` and :func:`shard_of_unacked` read the
``(job_id, shard)`` out of either.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

TASK_NAME = "genimg.generate_shard"
"""Celery task name of one shard (positional JSON args ``[job_id, shard_index]``)."""
ENQUEUE_BATCH = 1_000
"""Task messages per Redis pipeline when enqueueing."""


def producer_app(settings: Any, name: str = "genimg-producer") -> Any:
    """A Celery app that only sends shard messages (the workers' configuration, :func:`workers.config.celery_config`).

    Args:
        settings: :class:`~workers.config.WorkerSettings` (broker URL, queue, timing).
        name: the app's name.
    """
    from celery import Celery

    from workers.config import celery_config

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
