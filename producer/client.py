"""The Python client: submit dataset jobs and get :class:`~producer.job.Job` handles back.

::

    from producer import Client
    client = Client()                                   # GENIMG_* environment
    job = client.submit(prompts=["a handwritten 7", "a zero"], images_per_prompt=4,
                        output="s3://bucket/run-7", seed=1234)
    job = client.submit(count=100_000, output="s3://bucket/noise", seed=7)
    job.wait(progress=True)
    job.status(); job.cancel(); job.resume(); table = job.manifest()

Submission order (nothing is stored or enqueued for an invalid job):

1. every field is validated (``JobSpec.create``; prompts with a provisional
   count), the prompt source is opened, the output bucket is checked;
2. an idempotency key, if given, is claimed (``SET {p}:idem:{key} NX``); a key
   already claimed returns the existing job and enqueues nothing, or raises
   :class:`~genimg.errors.ConflictError` if that job's spec differs (every
   field but the derived ones and the prompt count);
3. prompts are streamed into chunks in storage while they are counted and
   validated; any invalid prompt raises a ``ValidationError`` naming its line,
   after the chunks already written are deleted;
4. ``job.json`` is written, then the spec is stored in Redis;
5. one JSON task message per shard is enqueued (Celery task
   ``genimg.generate_shard``, args ``[job_id, shard_index]``), in pipelined
   batches over one broker connection.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from genimg import jobs
from genimg.errors import (
    ConflictError,
    GenImgError,
    QueueUnavailableError,
    StorageNotFoundError,
    ValidationError,
)
from genimg.expand import WILDCARDS_OBJECT, wildcards_json
from genimg.expand import prepare as prepare_expand
from genimg.inputs import (
    PromptHasher,
    chunk_prompts,
    encode_prompt_chunk,
    iter_prompts,
    prompt_chunk_key,
    prompts_digest,
)
from genimg.jobs import Keys
from genimg.layout import SPEC_OBJECT, Layout, check_job_id
from genimg.limits import MAX_SHARDS, MAX_TOTAL_ITEMS, prompt_problem
from genimg.profiles import load_profiles
from genimg.queue import celery_priority, describe_redis_error, producer_app, send_shards
from genimg.redaction import install_secret_redaction, redact_url, register_url_secret
from genimg.settings import SpecSettings, StorageSettings, WorkerSettings, check_spec_settings, load_settings
from genimg.spec import JobSpec
from genimg.stores import ManagedStore, open_job_store
from genimg.stores.s3_client import check_storage
from genimg.urls import validate_output_url
from producer.job import Job, JobNotFoundError

log = logging.getLogger(__name__)

UPLOAD_THREADS = 8
"""Prompt chunks uploaded in parallel."""
MAX_UPLOADS_IN_FLIGHT = 16
"""Prompt chunks encoded but not yet stored (bounds the producer's memory)."""
IDEMPOTENCY_CLAIM_TTL_S = 3_600
"""Seconds an idempotency key stays claimed by a submit that has not finished (a crashed one)."""
CONCURRENT_SUBMIT_WAIT_S = 120.0
"""How long a submit waits for a concurrent submit with the same idempotency key to store its spec."""
CONCURRENT_SUBMIT_POLL_S = 0.1
"""Seconds between two looks at that concurrent submit."""
DEFAULT_TEXT_MODEL = "txt2img"
"""The profile a job with prompts and no ``model`` runs."""
DEFAULT_NOISE_MODEL = "noise2img"
"""The profile a job with a count and no ``model`` runs."""


class Client:
    """Submits jobs and opens handles on them.

    Every argument falls back to the ``GENIMG_*`` environment (``GENIMG_REDIS_URL``,
    ``GENIMG_QUEUE``, ``GENIMG_KEY_PREFIX``, ``GENIMG_S3_*``,
    ``GENIMG_LOCAL_OUTPUT_ROOT``); the producer and the workers must agree on
    the Redis URL, queue and key prefix.

    Args:
        redis_url: broker URL (``redis://`` or ``rediss://``); a password in it is never logged.
        queue: Celery queue the shards go to.
        key_prefix: prefix of genimg's Redis keys.
        storage: S3 settings.
        spec_settings: where ``file://`` outputs may go.

    Raises:
        ConfigError: an invalid setting (one line naming the ``GENIMG_*`` variable and the allowed values).
    """

    def __init__(self, redis_url: str | None = None, *, queue: str | None = None,
                 key_prefix: str | None = None, storage: StorageSettings | None = None,
                 spec_settings: SpecSettings | None = None) -> None:
        overrides: dict[str, Any] = {k: v for k, v in {"redis_url": redis_url, "queue": queue,
                                                        "key_prefix": key_prefix}.items() if v is not None}
        self.settings = load_settings(WorkerSettings, **overrides)
        self.storage_settings = storage or StorageSettings.checked()
        self.spec_settings = spec_settings or SpecSettings.checked()
        check_storage(self.storage_settings)
        check_spec_settings(self.spec_settings)
        url = self.settings.redis_url.get_secret_value()
        register_url_secret(url)
        install_secret_redaction()
        self.keys = Keys(self.settings.key_prefix)
        self._redis: redis.Redis | None = None
        self._celery: Any = None
        self._stores: dict[str, tuple[ManagedStore, str]] = {}

    def __repr__(self) -> str:
        return (f"Client(redis_url={redact_url(self.settings.redis_url.get_secret_value())!r}, "
                f"queue={self.settings.queue!r}, key_prefix={self.settings.key_prefix!r})")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release Redis, broker and storage connections."""
        if self._celery is not None:
            self._celery.close()
            self._celery = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        for store, _ in self._stores.values():
            store.close()
        self._stores.clear()

    # ---- connections

    @property
    def redis(self) -> redis.Redis:
        """The Redis client (bytes responses), connected lazily."""
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.settings.redis_url.get_secret_value(),
                                               socket_timeout=30, socket_connect_timeout=10,
                                               health_check_interval=30)
        return self._redis

    def _app(self) -> Any:
        if self._celery is None:
            self._celery = producer_app(self.settings)
        return self._celery

    def job_store(self, spec: JobSpec) -> tuple[ManagedStore, Layout]:
        """The store holding ``spec``'s output and the job's layout in it (stores are reused)."""
        return open_job_store(spec.output, spec.job_id, self.storage_settings, callers=UPLOAD_THREADS,
                              cache=self._stores)

    # ---- jobs

    def load_spec(self, job_id: str, *, output: str | None = None) -> JobSpec:
        """A job's spec from Redis, else from ``{output}/{job_id}/job.json``.

        Raises:
            ValidationError: ``field="job_id"`` for a malformed id; or the stored spec is invalid.
            JobNotFoundError: neither Redis nor storage (when ``output`` is given) knows the job.
        """
        check_job_id(job_id)
        raw = jobs.read_spec_json(self.redis, self.keys, job_id)
        if raw is None:
            if output is None:
                raise JobNotFoundError(f"job {job_id} is unknown to Redis; pass its output URL "
                                       "to read job.json from storage")
            url = validate_output_url(output, local_output_root=self.spec_settings.local_output_root)
            store, layout = open_job_store(url, job_id, self.storage_settings, callers=UPLOAD_THREADS,
                                           cache=self._stores)
            try:
                raw = store.get_bytes(f"{layout.job_prefix}/{SPEC_OBJECT}", max_bytes=1 << 20)
            except StorageNotFoundError as e:
                raise JobNotFoundError(f"job {job_id} is unknown to Redis and has no job.json "
                                       f"under {url}") from e
        spec = JobSpec.from_json(raw, settings=self.spec_settings)
        if spec.job_id != job_id:
            raise ValidationError(f"stored spec names job {spec.job_id}, not {job_id}", field="job_id")
        return spec

    def job(self, job_id: str, *, output: str | None = None) -> Job:
        """A handle on an existing job (``output`` finds it in storage after a Redis loss).

        Raises:
            ValidationError: a malformed job id.
            JobNotFoundError: the job is unknown.
        """
        return Job(self, job_id, spec=self.load_spec(job_id, output=output))

    def jobs(self, limit: int = 20) -> list[Job]:
        """The most recently submitted jobs, newest first (those Redis still knows)."""
        out = []
        for job_id in jobs.recent_job_ids(self.redis, self.keys, limit):
            try:
                out.append(self.job(job_id))
            except (JobNotFoundError, ValidationError) as e:
                log.warning("skipping job %s: %s", job_id, e)
        return out

    def submit(self, prompts: str | os.PathLike[str] | Iterable[str] | None = None, *, count: int | None = None,
               model: str | None = None, params: Mapping[str, Any] | None = None,
               negative_prompt: str | None = None, images_per_prompt: int | None = None, output: str | None = None,
               seed: int | None = None, image_format: str | None = None, quality: int | None = None,
               shard_size: int | None = None, sub_batch_size: int | None = None, upscale: bool | None = None,
               priority: int | str | None = None, name: str | None = None, idempotency_key: str | None = None,
               prompt_column: str | None = None, prompt_format: str | None = None,
               prompt_chunk_size: int | None = None, manifest_part_shards: int | None = None,
               expand: Mapping[str, Any] | None = None, keep_if: str | None = None,
               regenerate: int | None = None, dedup: str | None = None) -> Job:
        """Validate, store and enqueue a job (see the module docstring for the order).

        Give ``prompts`` (a text profile: a list or iterable of str, or a path to a
        .txt/.jsonl/.csv/.parquet file, read streaming) or ``count`` (a noise
        profile). Unset arguments take :class:`~genimg.spec.JobSpec`'s
        defaults; ``output`` falls back to ``GENIMG_OUTPUT``.

        Args:
            prompts: the prompts, or a file of them (a plain ``str`` is a path).
            count: number of noise samples (noise profiles).
            model: a model profile's name (``genimg models list``); default ``txt2img`` with
                prompts, ``noise2img`` with a count.
            params: the profile's generation parameters, ``{name: value}``; a list of values
                is a sweep (item ``i`` takes ``values[i % len(values)]``).
            negative_prompt: for profiles with a negative-prompt input.
            images_per_prompt: images per prompt (text profiles), 1..64.
            output: ``s3://bucket/prefix`` or ``file:///dir`` under ``GENIMG_LOCAL_OUTPUT_ROOT``.
            seed: job seed, 0..2**63-1.
            image_format: ``png``, ``webp`` or ``jpeg``.
            quality: 1..100 for lossy formats.
            shard_size: items per shard, 1..10,000.
            sub_batch_size: items per Triton request, 1..256.
            upscale: ``False`` runs the profile's variant without upscaling (digits: 28x28).
            priority: 0..9 or ``low``/``normal``/``high``; higher runs sooner.
            name: optional label.
            idempotency_key: submitting the same key again with the same spec returns the same job;
                with a different spec it raises :class:`~genimg.errors.ConflictError`.
            prompt_column: field/column of JSONL, CSV or Parquet prompts (default ``prompt``).
            prompt_format: ``text``, ``jsonl``, ``csv`` or ``parquet`` (default from the suffix).
            prompt_chunk_size: prompts per stored chunk (default 1,000).
            manifest_part_shards: shards per manifest part, 1..1,000 (default: about 100,000
                rows a part, see :func:`genimg.shardplan.manifest_part_shards_for`).
            expand: prompt expansion (:mod:`genimg.expand`): ``{"template": "{a|b} {prompt}",
                "model": "prompt_expander" or None, "instruction": "... {text} ...",
                "max_new_tokens": 48, "temperature": 0.7, "per": "prompt", "wildcards_dir": "dir"}``;
                every key is optional. The wildcard files the template names are read from
                ``wildcards_dir`` now and stored with the job (``inputs/wildcards.json``).
            keep_if: keep only images whose metadata passes ``"<column> <op> <number>"`` on one of the
                profile's int or float metadata columns (``"score >= 0.9"``; op: ``>= > <= < == !=``).
            regenerate: with ``keep_if``, extra seeds each item may try, 0..64 (default 0); an item that
                never passes is recorded failed with reason ``keep_if_unmet`` (:mod:`genimg.keepif`).
            dedup: ``"exact"`` or ``"near"``: mark duplicates in the manifest's ``duplicate_of`` column
                when the job finishes (:mod:`genimg.dedup`); by default they are only reported
                (``dedup.json``, the dataset card). Nothing is deleted.

        Returns:
            The job's handle. With an idempotency key already claimed, the
            existing job's handle (nothing is stored or enqueued); if that
            earlier submit is still storing prompts, its spec becomes readable
            once it has finished.

        Raises:
            ValidationError: an invalid field, parameter or prompt (``.field`` names it, e.g.
                ``params.steps``); nothing was stored.
            ConflictError: the idempotency key was used before for a different spec (``.key`` names it);
                nothing was stored or enqueued.
            QueueUnavailableError: Redis is unreachable.
            StorageError: storage is unreachable or refused.
        """
        if model is None:
            model = DEFAULT_NOISE_MODEL if count is not None and prompts is None else DEFAULT_TEXT_MODEL
        if prompts is not None and count is not None:
            raise ValidationError("give prompts (a text profile) or count (a noise profile), not both",
                                  field="prompts")
        profiles = load_profiles()
        task = profiles.resolve(model, upscale=upscale if isinstance(upscale, bool) else True).task
        if task == "text" and prompts is None and count is None:
            raise ValidationError(f"give prompts (profile {model!r} is a text profile)", field="prompts")
        if task == "noise" and prompts is not None:
            raise ValidationError(f"profile {model!r} is a noise profile: it takes count, not prompts",
                                  field="prompts")
        expand_fields, wildcards = prepare_expand(expand)
        for wildcard, options in wildcards.items():
            for line in options:
                problem = prompt_problem(line)
                if problem is not None:
                    raise ValidationError(f"wildcard file {wildcard}.txt: option {line[:40]!r} {problem}",
                                          field="expand.wildcards_dir")
        fields: dict[str, Any] = {
            "expand": expand_fields,
            "model": model, "params": params, "negative_prompt": negative_prompt,
            "images_per_prompt": images_per_prompt,
            "output": output if output is not None else os.environ.get("GENIMG_OUTPUT"),
            "seed": seed, "image_format": image_format, "quality": quality, "shard_size": shard_size,
            "sub_batch_size": sub_batch_size, "upscale": upscale, "priority": priority, "name": name,
            "idempotency_key": idempotency_key, "prompt_chunk_size": prompt_chunk_size,
            "manifest_part_shards": manifest_part_shards, "keep_if": keep_if, "regenerate": regenerate,
            "dedup": dedup,
        }
        fields = {k: v for k, v in fields.items() if v is not None}
        txt = task == "text" and prompts is not None
        size = {"num_prompts": 1} if txt else {"count": count}
        spec = JobSpec.create(settings=self.spec_settings, profiles=profiles, **fields, **size)
        fields.update(job_id=spec.job_id, created_at=spec.created_at)
        stream = _open_prompts(prompts, prompt_column, prompt_format) if txt else None

        store, layout = self.job_store(spec)
        try:
            existing = store.list_keys(f"{layout.job_prefix}/")
        except StorageNotFoundError as e:
            raise ValidationError(f"bucket {store.bucket!r} does not exist (got {spec.output!r})",
                                  field="output") from e

        idem = idempotency_key
        if idem is not None:
            if not self._claim_or_match(idem, spec, store, layout, stream):
                log.info("idempotency key already used by job %s; nothing enqueued", spec.job_id)
                return Job(self, spec.job_id, output=spec.output)
            if f"{layout.job_prefix}/{SPEC_OBJECT}" in existing:
                return self._adopt_stored_job(spec, store, layout, idem, stream)

        try:
            if stream is not None:
                n, digest = self._store_prompts(stream, spec, store, layout, fields)
                spec = JobSpec.create(settings=self.spec_settings, profiles=profiles, **fields, num_prompts=n,
                                      prompts_sha256=digest)
            if wildcards:
                store.put_bytes(f"{layout.job_prefix}/{WILDCARDS_OBJECT}", wildcards_json(wildcards),
                                "application/json")
            store.put_bytes(f"{layout.job_prefix}/{SPEC_OBJECT}", spec.to_json().encode(), "application/json")
            jobs.store_spec(self.redis, self.keys, spec)
        except BaseException:
            self._discard(store, layout, idem)
            raise
        if idem is not None:
            jobs.keep_idempotency_key(self.redis, self.keys, idem)
        log.info("stored job %s: %s, %d items in %d shards under %s", spec.job_id, spec.model,
                 spec.total_items, spec.shard_plan().num_shards, spec.job_prefix)
        self.enqueue_shards(spec, range(spec.shard_plan().num_shards))
        return Job(self, spec.job_id, spec=spec)

    def _claim_or_match(self, idem: str, spec: JobSpec, store: ManagedStore, layout: Layout,
                        stream: Iterable[str] | None) -> bool:
        """Claim the idempotency key (True), or find the job it names asking for the same spec (False).

        A submit that holds the claim but has not stored its spec yet (still storing prompts) is waited
        for, polling, for at most :data:`CONCURRENT_SUBMIT_WAIT_S`, so that two concurrent submits with one
        key and different specs never both succeed; if that submit gives up (its claim is released), this
        one claims the key.

        Raises:
            ConflictError: the key's job asks for another spec or other prompts, or its submit is still
                storing after the wait.
        """
        deadline = time.monotonic() + CONCURRENT_SUBMIT_WAIT_S
        spec_key = f"{layout.job_prefix}/{SPEC_OBJECT}"
        while not jobs.claim_idempotency_key(self.redis, self.keys, idem, spec.job_id, IDEMPOTENCY_CLAIM_TTL_S):
            raw = jobs.read_spec_json(self.redis, self.keys, spec.job_id)
            if raw is None:
                try:
                    raw = store.get_bytes(spec_key, max_bytes=1 << 20)
                except StorageNotFoundError:
                    raw = None
            if raw is not None:
                stored = JobSpec.from_json(raw, settings=self.spec_settings)
                _check_same_request(stored, spec)
                _check_same_prompts(stored, stream)
                return False
            if time.monotonic() > deadline:
                try:
                    left = int(self.redis.ttl(self.keys.idem(idem)))
                except (redis.RedisError, TypeError, ValueError):
                    left = IDEMPOTENCY_CLAIM_TTL_S
                raise ConflictError(f"idempotency key {idem!r} is held by a submit of job {spec.job_id} that is "
                                    f"still storing its inputs after {CONCURRENT_SUBMIT_WAIT_S:g} s; submit "
                                    "again once it has finished (if that submit was killed, its claim expires "
                                    f"in at most {max(0, left)} s)", key=idem)
            time.sleep(CONCURRENT_SUBMIT_POLL_S)  # the poll period of the wait above
        return True

    def _adopt_stored_job(self, spec: JobSpec, store: ManagedStore, layout: Layout, idem: str,
                          stream: Iterable[str] | None) -> Job:
        """Same idempotency key, Redis lost, job.json in storage: re-register the stored job."""
        stored = JobSpec.from_json(store.get_bytes(f"{layout.job_prefix}/{SPEC_OBJECT}"),
                                   settings=self.spec_settings)
        try:
            _check_same_request(stored, spec)
            _check_same_prompts(stored, stream)
        except ConflictError:
            jobs.release_idempotency_key(self.redis, self.keys, idem)
            raise
        jobs.store_spec(self.redis, self.keys, stored)
        jobs.keep_idempotency_key(self.redis, self.keys, idem)
        log.info("job %s is already stored under %s; nothing enqueued (use resume to finish it)",
                 spec.job_id, spec.output)
        return Job(self, stored.job_id, spec=stored)

    def _store_prompts(self, stream: Iterable[str], spec: JobSpec, store: ManagedStore, layout: Layout,
                       fields: dict[str, Any]) -> tuple[int, str]:
        """Upload prompt chunks while counting and hashing them; returns ``(num_prompts, sha256)``."""
        assert spec.prompt_chunk_size is not None
        ipp, chunk_size = spec.images_per_prompt, spec.prompt_chunk_size
        most = min(MAX_TOTAL_ITEMS, MAX_SHARDS * spec.shard_size) // ipp
        n = 0
        hasher = PromptHasher()
        pending: deque[Future[Any]] = deque()
        with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="genimg-upload") as pool:
            try:
                for c, chunk in enumerate(chunk_prompts(stream, chunk_size)):
                    n += len(chunk)
                    hasher.update(chunk)
                    if n > most:  # JobSpec says which limit, naming the field
                        JobSpec.create(settings=self.spec_settings, **fields, num_prompts=n)
                    key = f"{layout.job_prefix}/{prompt_chunk_key(c)}"
                    pending.append(pool.submit(store.put_bytes, key, encode_prompt_chunk(chunk),
                                               "application/json"))
                    while len(pending) >= MAX_UPLOADS_IN_FLIGHT or (pending and pending[0].done()):
                        pending.popleft().result()
                while pending:
                    pending.popleft().result()
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
        return n, hasher.hexdigest()

    def _discard(self, store: ManagedStore, layout: Layout, idem: str | None) -> None:
        """Undo a failed submit: delete what was stored and release the idempotency key."""
        try:
            deleted = store.delete_prefix(f"{layout.job_prefix}/")
            if deleted:
                log.info("submit failed: deleted %d stored objects of job %s", deleted, layout.job_id)
        except GenImgError as e:
            log.error("submit failed and its stored objects under %s could not be deleted: %s",
                      layout.job_prefix, e)
        try:
            jobs.forget_job(self.redis, self.keys, layout.job_id, idem)
        except QueueUnavailableError as e:
            log.error("submit failed and Redis could not be cleaned for job %s: %s", layout.job_id, e)

    def enqueue_shards(self, spec: JobSpec, shards: Iterable[int]) -> int:
        """Send one task message per shard (queue ``GENIMG_QUEUE``, the job's priority).

        Messages go out through one broker connection in pipelined batches of
        :data:`genimg.queue.ENQUEUE_BATCH`; the queue's binding is declared with the first.

        Returns:
            The number of messages sent.

        Raises:
            QueueUnavailableError: the broker is unreachable (some messages may
                have been sent; :meth:`Job.resume` sends the rest).
        """
        from kombu.exceptions import KombuError, OperationalError

        queue = self.settings.queue
        todo = list(shards)
        try:
            sent = send_shards(self._app(), queue, spec.job_id, celery_priority(spec.priority), todo)
        except (OperationalError, KombuError, redis.RedisError, OSError) as e:
            raise QueueUnavailableError(
                f"enqueueing job {spec.job_id} failed ({describe_redis_error(e)}); some of its "
                f"{len(todo)} messages may have been sent: run resume to send the rest") from e
        log.info("enqueued job %s: %d shard messages on queue %s (priority %d)", spec.job_id, sent,
                 queue, spec.priority)
        return sent


def _open_prompts(prompts: Any, column: str | None, fmt: str | None) -> Iterable[str]:
    """Open the prompt source now, so a bad format, column or path fails before anything is stored."""
    try:
        if isinstance(prompts, (str, os.PathLike)):
            path = Path(prompts)
            if path.is_dir():
                raise ValidationError(f"is a directory, not a file: {str(path)!r}", field="prompts")
            return iter_prompts(path, column=column, fmt=fmt)
        if fmt is not None:
            raise ValidationError("applies to prompt files only, not to a list", field="prompt_format")
        return iter_prompts(prompts, column=column)
    except ValidationError as e:
        if e.field == "fmt":
            raise ValidationError(str(e).removeprefix("fmt: "), field="prompt_format") from None
        raise


_NOT_COMPARED = frozenset({"schema_version", "job_id", "created_at", "num_prompts", "prompts_sha256"})
"""Spec fields an idempotent resubmit may differ in: derived ones, and the prompt count and digest (prompts
are streamed into storage, not kept; they are only known after they have all been read, and
:func:`_check_same_prompts` compares them)."""


def _check_same_request(stored: JobSpec, new: JobSpec) -> None:
    """Raise :class:`ConflictError` unless ``new`` asks for the same job as ``stored`` (same idempotency key).

    Raises:
        ConflictError: naming the key and the fields that differ.
    """
    a, b = stored.model_dump(), new.model_dump()
    differ = sorted(k for k in a if k not in _NOT_COMPARED and a[k] != b.get(k))
    if differ:
        shown = ", ".join(f"{k} {a[k]!r} != {b.get(k)!r}" for k in differ[:5])
        raise ConflictError(f"idempotency key {new.idempotency_key!r} was already used for job {stored.job_id} "
                            f"with a different spec ({shown}); use a new key for a new job",
                            key=new.idempotency_key or "")


def _check_same_prompts(stored: JobSpec, stream: Iterable[str] | None) -> None:
    """Raise :class:`ConflictError` unless ``stream`` holds the prompts ``stored`` was made from.

    Reads the resubmitted prompts once (count and sha256, nothing stored). A spec stored before
    ``prompts_sha256`` existed is compared by count only.

    Raises:
        ConflictError: naming the key, the counts and the digests.
    """
    if stream is None or stored.num_prompts is None:
        return
    assert stored.prompt_chunk_size is not None
    n, digest = prompts_digest(chunk_prompts(stream, stored.prompt_chunk_size))
    if n == stored.num_prompts and stored.prompts_sha256 in (None, digest):
        return
    raise ConflictError(f"idempotency key {stored.idempotency_key!r} was already used for job {stored.job_id} "
                        f"with other prompts ({stored.num_prompts:,} prompts, sha256 "
                        f"{(stored.prompts_sha256 or '?')[:12]}…; now {n:,}, sha256 {digest[:12]}…); "
                        f"use a new key for a new job", key=stored.idempotency_key or "")

