"""One submitted dataset job: status, wait (with a progress bar), cancel, resume, manifest.

A :class:`Job` is a handle: the job's truth lives in Redis (progress, see
:mod:`genimg.jobs` for the keys) and in storage (``job.json``, prompt chunks,
committed shard indexes). Get one from :meth:`producer.client.Client.submit`
or :meth:`producer.client.Client.job`.

States (:attr:`JobStatus.state`): ``queued`` (no shard started), ``running``,
``succeeded`` (every shard committed, no failed item), ``failed`` (every
shard finished, some shard or item failed), ``cancelled``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from genimg import jobs
from genimg import manifest as manifests
from genimg.errors import GenImgError, StorageError, StorageNotFoundError
from genimg.layout import SPEC_OBJECT, SUCCESS_OBJECT, Layout
from genimg.manifest import ManifestTooLargeError, PartPlan, job_schema
from genimg.shards import committed_shards, read_shard_index
from genimg.spec import JobSpec
from genimg.stores import ManagedStore

if TYPE_CHECKING:
    from producer.client import Client

log = logging.getLogger(__name__)

FINISHED_STATES = ("succeeded", "failed", "cancelled")
DEFAULT_POLL_S = 1.0
"""Seconds between two status reads in :meth:`Job.wait`."""
FINALIZE_WAIT_S = 330.0
"""Longest wait, in seconds, for a worker that holds the finalising lock (its TTL is 300 s)."""
RESTORE_THREADS = 8
"""Parallel reads of shard stats when :meth:`Job.resume` rebuilds Redis from storage."""


class JobNotFoundError(StorageNotFoundError):
    """Neither Redis nor storage knows the job."""


class WaitTimeoutError(GenImgError, TimeoutError):
    """:meth:`Job.wait` ran past its ``timeout_s``; the job itself goes on."""


@dataclass(frozen=True)
class JobStatus:
    """A job's progress, as Redis knows it.

    Attributes:
        job_id: the job.
        name: the job's optional label.
        state: ``queued``, ``running``, ``succeeded``, ``failed`` or ``cancelled``.
        num_shards: shards planned.
        shards_queued: shards neither running nor finished.
        shards_running: shards a worker is running now.
        shards_done: shards committed.
        shards_failed: shards that failed permanently.
        items_total: images planned.
        items_done: images committed.
        items_failed: items recorded as failed inside committed shards.
        output: the job's output URL (files under ``{output}/{job_id}/``).
        created_at: submit time, ISO 8601 UTC.
        summary: the ``_SUCCESS`` summary once the job is finalised, else ``None``.
    """

    job_id: str
    name: str | None
    state: str
    num_shards: int
    shards_queued: int
    shards_running: int
    shards_done: int
    shards_failed: int
    items_total: int
    items_done: int
    items_failed: int
    output: str
    created_at: str
    summary: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        """Every shard is committed or failed (or the job is cancelled)."""
        return self.state in FINISHED_STATES

    @property
    def ok(self) -> bool:
        """The job succeeded."""
        return self.state == "succeeded"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every attribute."""
        return asdict(self)


class Job:
    """A handle on one job.

    Args:
        client: the :class:`~producer.client.Client` that reaches Redis and storage.
        job_id: 32 hex digits.
        spec: the job's spec when the caller has it (else read on first use).
        output: where to look for ``job.json`` if Redis has lost the job.
    """

    def __init__(self, client: Client, job_id: str, *, spec: JobSpec | None = None,
                 output: str | None = None) -> None:
        self._client = client
        self.job_id = job_id
        self._spec = spec
        self._output = output if spec is None else spec.output

    def __repr__(self) -> str:
        return f"Job({self.job_id!r})"

    # ---- spec and store

    @property
    def spec(self) -> JobSpec:
        """The job's spec (Redis first, then ``job.json`` under the known output).

        Raises:
            JobNotFoundError: neither knows the job.
            ValidationError: the stored spec is invalid.
        """
        if self._spec is None:
            self._spec = self._client.load_spec(self.job_id, output=self._output)
            self._output = self._spec.output
        return self._spec

    def _store(self) -> tuple[ManagedStore, Layout]:
        return self._client.job_store(self.spec)

    # ---- status

    def status(self) -> JobStatus:
        """The job's progress from Redis.

        Raises:
            QueueUnavailableError: Redis is unreachable.
        """
        spec = self.spec
        r, keys = self._client.redis, self._client.keys
        c = jobs.counts(r, keys, spec)
        summary = jobs.stored_summary(r, keys, self.job_id)
        if summary is not None and not c.cancelled and not c.finished:
            summary = None  # left over from before a resume
        queued = max(0, c.num_shards - c.shards_done - c.shards_failed - c.shards_running)
        return JobStatus(
            job_id=self.job_id, name=spec.name, state=c.state, num_shards=c.num_shards,
            shards_queued=queued, shards_running=c.shards_running, shards_done=c.shards_done,
            shards_failed=c.shards_failed, items_total=spec.total_items, items_done=c.items_ok,
            items_failed=c.items_failed, output=spec.output, created_at=spec.created_at.isoformat(),
            summary=summary,
        )

    def wait(self, progress: bool = True, timeout_s: float | None = None,
             poll_s: float = DEFAULT_POLL_S) -> JobStatus:
        """Block until the job is finished or cancelled; finalise it if no worker has.

        When every shard is committed or failed but no ``_SUCCESS`` summary
        exists yet (e.g. the last worker died after its commit), this writes
        the manifest's missing parts and ``_SUCCESS`` itself.

        Args:
            progress: draw a progress bar on stderr (images, images/s, ETA, failures).
            timeout_s: give up after this many seconds (``None``: wait for ever).
            poll_s: seconds between two status reads.

        Returns:
            The final status (check :attr:`JobStatus.state`).

        Raises:
            WaitTimeoutError: ``timeout_s`` passed first.
            QueueUnavailableError: Redis is unreachable.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with _ProgressBar(self.spec.total_items, enabled=progress, label=self.spec.name or self.job_id[:8]) as bar:
            while True:
                st = self.status()
                bar.update(st)
                if st.state == "cancelled":
                    return st
                if st.finished:
                    if st.summary is None:
                        st = self._finalize(deadline)
                    bar.update(st)
                    return st
                _sleep_until_next_poll(deadline, poll_s, self.job_id)

    def _finalize(self, deadline: float | None) -> JobStatus:
        store, layout = self._store()
        r, keys = self._client.redis, self._client.keys
        if jobs.finalize_if_complete(r, keys, store, layout, self.spec):
            log.info("finalised job %s (no worker had)", self.job_id)
            return self.status()
        # A worker holds the finalising lock: wait for its summary.
        limit = time.monotonic() + FINALIZE_WAIT_S
        while True:
            st = self.status()
            if st.summary is not None or st.state == "cancelled":
                return st
            if time.monotonic() > limit:
                if jobs.finalize_if_complete(r, keys, store, layout, self.spec):
                    return self.status()
                return st
            _sleep_until_next_poll(deadline, 0.5, self.job_id)

    # ---- control

    def cancel(self) -> JobStatus:
        """Cancel the job: no shard starts from now on; shards already running finish.

        Queued messages stay in Redis; a worker that receives one sees the
        ``cancelled`` state and skips it. A job that has already finished
        (``succeeded`` or ``failed``) keeps its state: there is nothing left to cancel.

        Returns:
            The job's status after the call (``cancelled``, or the finished state it kept).

        Raises:
            QueueUnavailableError: Redis is unreachable.
        """
        before = self.status()
        if before.state in ("succeeded", "failed"):
            log.info("job %s already %s; nothing to cancel", self.job_id, before.state)
            return before
        r, keys = self._client.redis, self._client.keys
        jobs.cancel(r, keys, self.job_id)
        log.info("cancelled job %s", self.job_id)
        return self.status()

    def resume(self) -> int:
        """Re-enqueue every shard with no committed index in storage, whatever Redis lost.

        Storage is the truth: the spec is restored into Redis from
        ``job.json``; the done-hash (and its item totals) is rebuilt from the
        committed shards' stats; a ``cancelled`` state, failure records, stale
        running records and the reconciler's re-enqueue counts of uncommitted
        shards are cleared, as are ``_SUCCESS`` and the manifest parts of their
        ranges; then one message per
        uncommitted shard is enqueued. A shard that is still queued from
        before may thus run twice; the second run finds it committed and
        skips it. When nothing is left to do, the job is finalised.

        Returns:
            The number of shards enqueued.

        Raises:
            JobNotFoundError: no ``job.json`` in storage.
            QueueUnavailableError: Redis is unreachable.
            StorageError: storage is unreachable or refused.
        """
        spec = self.spec
        store, layout = self._store()
        try:
            stored = JobSpec.from_json(store.get_bytes(f"{layout.job_prefix}/{SPEC_OBJECT}"),
                                       settings=self._client.spec_settings)
        except StorageNotFoundError as e:
            raise JobNotFoundError(f"job {self.job_id}: no {SPEC_OBJECT} under {spec.output}") from e
        self._spec = spec = stored
        r, keys = self._client.redis, self._client.keys
        jobs.store_spec(r, keys, spec)

        committed = committed_shards(store, layout)
        known = jobs.done_shards(r, keys, self.job_id)
        missing = [s for s in committed if s not in known]
        if missing:
            self._restore_done(store, layout, missing)
        committed_set = set(committed)
        todo = [s for s in range(spec.shard_plan().num_shards) if s not in committed_set]

        if todo:  # the parts of these shards' ranges and _SUCCESS are out of date once they run
            store.delete_prefix(f"{layout.job_prefix}/{SUCCESS_OBJECT}")
            manifests.invalidate_parts(store, layout, PartPlan.for_spec(spec), todo)
        jobs.reset_for_resume(r, keys, self.job_id, todo)
        jobs.recount_totals(r, keys, self.job_id)

        if not todo:
            jobs.finalize_if_complete(r, keys, store, layout, spec)
            log.info("resume job %s: every shard is committed; nothing to enqueue", self.job_id)
            return 0
        sent = self._client.enqueue_shards(spec, todo)
        log.info("resume job %s: %d committed, %d shards re-enqueued (%d done records restored)",
                 self.job_id, len(committed), sent, len(missing))
        return sent

    def _restore_done(self, store: ManagedStore, layout: Layout, shards: list[int]) -> None:
        """Put committed shards back into the done-hash with their item counts."""

        def counts(shard: int) -> tuple[int, tuple[int, int]]:
            try:
                stats = json.loads(store.get_bytes(layout.stats_key(shard), max_bytes=1 << 20))
                return shard, (int(stats["items_ok"]), int(stats["items_failed"]))
            except (StorageError, ValueError, KeyError, TypeError):
                index = read_shard_index(store, layout, shard)
                ok = sum(1 for s in index.column("status").to_pylist() if s == "ok")
                return shard, (ok, index.num_rows - ok)

        with ThreadPoolExecutor(RESTORE_THREADS) as pool:
            item_counts = dict(pool.map(counts, shards))
        jobs.restore_done(self._client.redis, self._client.keys, self.job_id, item_counts)

    # ---- results

    @property
    def manifest_url(self) -> str:
        """``{output}/{job_id}/manifest/``: the manifest's Parquet parts, readable as one dataset."""
        return f"{self.spec.job_prefix}/manifest/"

    def manifest(self, max_rows: int = manifests.TABLE_MAX_ROWS) -> pa.Table:
        """The job's manifest as one in-memory table, for jobs of at most ``max_rows`` items.

        One row per item (ok or failed), sorted by item index:
        :data:`genimg.index.INDEX_SCHEMA`'s columns, then the profile's
        metadata columns. Parts already written are read; those of a running
        job are built from its committed shards (nothing is written). Bigger
        jobs: :meth:`iter_manifest`, or read :attr:`manifest_url` as a dataset.

        Raises:
            ManifestTooLargeError: the job plans more than ``max_rows`` items.
            StorageError: storage is unreachable, or an index is unreadable.
        """
        spec = self.spec
        if spec.total_items > max_rows:
            raise ManifestTooLargeError(f"job {self.job_id} has {spec.total_items:,} items, more than "
                                        f"{max_rows:,} for one table; use Job.iter_manifest() or read "
                                        f"{self.manifest_url} as a dataset", field="max_rows")
        store, layout = self._store()
        return manifests.read_table(store, layout, PartPlan.for_spec(spec), schema=job_schema(spec),
                                    max_rows=max_rows)

    def iter_manifest(self, batch_rows: int = manifests.BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Stream the manifest as record batches of at most ``batch_rows`` rows, in item order.

        Memory stays bounded by a few manifest parts (~100,000 rows each)
        whatever the job's size. Rows and columns as :meth:`manifest`.

        Raises:
            StorageError: storage is unreachable, or a part or index is unreadable.
        """
        spec = self.spec
        store, layout = self._store()
        yield from manifests.iter_batches(store, layout, PartPlan.for_spec(spec), schema=job_schema(spec),
                                          batch_rows=batch_rows)


def _sleep_until_next_poll(deadline: float | None, poll_s: float, job_id: str) -> None:
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeoutError(f"job {job_id} still running after the wait timeout")
        poll_s = min(poll_s, left)
    time.sleep(poll_s)  # a polling interval: the job's progress lives in Redis


class _ProgressBar:
    """A rich progress bar on stderr: images done/total, images/s, ETA, failures."""

    def __init__(self, total: int, *, enabled: bool, label: str) -> None:
        self.enabled = enabled
        self.total = total
        self.label = label
        self._progress: Any = None
        self._task: Any = None
        self._start = time.monotonic()
        self._first: int | None = None

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} img/s"), TextColumn("ETA {task.fields[eta]}"),
                TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, rate="-", eta="-",
                                                 failed="0")
        return self

    def update(self, st: JobStatus) -> None:
        if not self.enabled:
            return
        done = st.items_done + st.items_failed
        now = time.monotonic()
        if self._first is None:
            self._first, self._start = done, now
        elapsed = now - self._start
        rate = (done - self._first) / elapsed if elapsed > 0 else 0.0
        eta = "-"
        if rate > 0 and done < self.total:
            eta = _duration(int((self.total - done) / rate))
        failed = f"{st.items_failed} items"
        if st.shards_failed:
            failed += f", {st.shards_failed} shards"
        self._progress.update(self._task, completed=done, rate=f"{rate:,.1f}", eta=eta, failed=failed,
                              description=f"{self.label} {st.state}")

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _duration(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
