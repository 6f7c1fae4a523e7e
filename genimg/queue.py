"""The Celery queue on Redis: priorities, the backlog signal and the one translator of Redis errors.

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

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from genimg.errors import QueueUnavailableError

PRIORITY_STEPS = [0, 3, 6, 9]
"""kombu Redis priority steps (Celery priority values; 0 is served first)."""
KOMBU_SEP = "\x06\x16"
"""kombu's separator between a queue name and its priority step."""
UNACKED_KEY = "unacked"
"""kombu's hash of delivered-but-unacknowledged messages (acks late: reserved or running)."""


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
