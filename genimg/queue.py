"""Queue names, Redis key layout, job bookkeeping and the backlog signal.

Priorities: one Celery queue (``genimg`` by default) with kombu's Redis
priority emulation (``priority_steps`` :data:`PRIORITY_STEPS`,
``queue_order_strategy="priority"``). kombu then keeps one Redis list per
step and always pops the highest-priority non-empty list first; a queue per
priority level would instead be polled round-robin by kombu, which lets low
priority work overtake high. Celery's Redis priorities run 0 (highest) to 9;
genimg's ``priority`` (0 lowest … 9 highest) is mapped by :func:`celery_priority`.

Redis keys (``{p}`` is the key prefix, ``GENIMG_KEY_PREFIX``, default ``genimg``):

| key | type | meaning |
| --- | --- | --- |
| ``{p}:job:{id}:spec`` | string | the JobSpec JSON (also in storage as ``job.json``) |
| ``{p}:job:{id}:done`` | hash | shard → ``"ok_items,failed_items"`` of each committed shard |
| ``{p}:job:{id}:failed`` | hash | shard → reason, shards that failed permanently |
| ``{p}:job:{id}:running`` | hash | shard → worker hostname, while a worker runs it |
| ``{p}:job:{id}:totals`` | hash | ``items_ok``, ``items_failed``: sums over the done-hash, kept by :func:`genimg.jobs.mark_done` |
| ``{p}:job:{id}:state`` | string | ``cancelled`` once cancelled (otherwise derived) |
| ``{p}:job:{id}:healed`` | hash | shard → times the reconciler re-enqueued it (``genimg reconcile``) |
| ``{p}:job:{id}:summary`` | string | the ``_SUCCESS`` summary once finalised |
| ``{p}:job:{id}:finalizing`` | string | the finaliser's lock (300 s TTL) |
| ``{p}:job:{id}:part:{n}`` | string | lock of a worker writing manifest part ``n`` (300 s TTL) |
| ``{p}:jobs`` | sorted set | job ids by submit time |
| ``{p}:idem:{key}`` | string | job id of an idempotency key |
| ``{p}:reconciler:lease`` | string | token of the ``genimg reconcile`` replica that acts (expires) |

Completion is counted by hash membership, so a shard committed twice counts once.
"""

from __future__ import annotations

import json
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


def celery_priority(priority: int) -> int:
    """Map genimg priority 0 (lowest) … 9 (highest) to Celery's Redis priority 9 … 0."""
    if not 0 <= priority <= 9:
        raise ValueError(f"priority must be 0..9, got {priority}")
    return 9 - priority


def priority_lists(queue: str) -> list[str]:
    """The Redis list names kombu uses for ``queue``, one per priority step."""
    return [queue if step == 0 else f"{queue}{KOMBU_SEP}{step}" for step in PRIORITY_STEPS]


@dataclass(frozen=True)
class Keys:
    """Redis key names of one key prefix."""

    prefix: str = "genimg"

    def job(self, job_id: str, part: str) -> str:
        return f"{self.prefix}:job:{job_id}:{part}"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    def idem(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"


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
    try:
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
    except redis.RedisError as e:
        raise QueueUnavailableError(f"Redis unavailable while reading the backlog: {type(e).__name__}") from e
    return Backlog(queue=queue, waiting=int(waiting), reserved=int(reserved))
