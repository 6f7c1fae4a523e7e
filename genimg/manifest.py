"""The job manifest: one row per item, as Parquet parts that each cover a fixed range of shards.

Layout under ``{job_prefix}/manifest/`` (see :class:`genimg.layout.Layout`)::

    part-00000.parquet     the rows of shards [0, R): every committed index, one row per item
    _part-00000.json       that part's summary, written after it (the part's commit marker)
    part-00001.parquet     shards [R, 2R) ...

``R`` (:attr:`PartPlan.part_shards`) is the job's ``manifest_part_shards``
(stored in ``job.json``; by default :func:`part_shards_for` of the shard
size: about :data:`PART_ROWS` rows a part, at most :data:`MAX_PART_SHARDS`
shards). A part is a sorted, de-duplicated concatenation of its shards'
indexes (:func:`genimg.index.dedupe_index`: one row per item index, an
``ok`` row wins) with the job's schema (:func:`job_schema`), written with the
index's fixed codec, so the same shards give byte-identical parts. Item
indices of different shards never overlap (a shard holds exactly its
:class:`~genimg.shardplan.ShardPlan` range), so de-duplicating each part
de-duplicates the manifest, and parts concatenated in order are sorted by
item index.

The directory reads as one dataset: ``pyarrow.dataset.dataset(url, format=
"parquet")``, ``pandas.read_parquet(url)`` (both skip the ``_`` files) or
Hugging Face ``datasets.load_dataset("parquet", data_files=f"{url}/part-*.parquet")``.

**Who writes a part.** The worker that marks the last shard of a range done
(every shard of it committed) builds that part (:func:`genimg.jobs.compact_part_if_complete`);
such a part is *final*: its shards' indexes never change. The finaliser
(:func:`finalize_parts`) writes only parts without a final summary (a range
with a failed shard, a worker that died while compacting), in bounded
parallel reads, then sums the part summaries for ``_SUCCESS``. Time and
memory of one part are bounded by ``R`` shards; finalisation's by the parts
it has to write, never by the whole job held at once.
"""

from __future__ import annotations

import builtins
import json
import logging
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from genimg.errors import StorageError, StorageNotFoundError, ValidationError
from genimg.index import (
    DUPLICATE_OF,
    INDEX_SCHEMA,
    STATUS_OK,
    dedupe_index,
    index_from_parquet,
    index_schema,
    index_to_parquet,
)
from genimg.layout import Layout
from genimg.limits import MANIFEST_PART_ROWS, MAX_MANIFEST_PART_SHARDS, MAX_MANIFEST_PARTS
from genimg.shardplan import manifest_part_shards_for
from genimg.shards import committed_shards
from genimg.stores.base import ObjectStore, sha256_hex

if TYPE_CHECKING:
    from genimg.spec import JobSpec

log = logging.getLogger(__name__)

PART_DIGITS = 5
"""Digits of a part's file name: at most ``MAX_MANIFEST_PARTS`` (10**5) parts."""
PART_ROWS = MANIFEST_PART_ROWS
MAX_PART_SHARDS = MAX_MANIFEST_PART_SHARDS
READ_THREADS = 8
"""Parallel index reads while building parts (each read is one GET)."""
BUILD_PARTS = 2
"""Parts the finaliser builds at once (deduplicating and encoding one part is single-threaded)."""
TABLE_MAX_ROWS = 1_000_000
"""Most rows :func:`read_table` (and ``Job.manifest()``) returns as one in-memory table (~300 MB)."""
BATCH_ROWS = 65_536
"""Rows per record batch when streaming the manifest."""

_PART_RE = re.compile(rf"part-(\d{{{PART_DIGITS}}})\.parquet$")
_SUMMARY_RE = re.compile(rf"_part-(\d{{{PART_DIGITS}}})\.json$")


class ManifestTooLargeError(ValidationError):
    """The manifest has more rows than asked for as one table; stream it instead."""


part_shards_for = manifest_part_shards_for


def job_schema(spec: JobSpec) -> pa.Schema:
    """The job's manifest schema: the index columns, the profile's metadata columns, then ``duplicate_of``
    for a job with ``dedup`` (filled at finalisation, :mod:`genimg.dedup`)."""
    schema = index_schema(spec.metadata_columns)
    return schema.append(DUPLICATE_OF) if spec.dedup is not None else schema


@dataclass(frozen=True)
class PartPlan:
    """Shards ``[0, num_shards)`` cut into parts of ``part_shards`` consecutive shards (the last may be shorter).

    Raises:
        ValidationError: non-positive sizes or more than ``MAX_MANIFEST_PARTS`` parts.
    """

    num_shards: int
    part_shards: int

    def __post_init__(self) -> None:
        if self.num_shards < 0 or self.part_shards < 1:
            raise ValidationError(f"bad part plan: {self.num_shards} shards in parts of {self.part_shards}")
        if self.num_parts > MAX_MANIFEST_PARTS:
            raise ValidationError(f"{self.num_shards:,} shards in parts of {self.part_shards} make "
                                  f"{self.num_parts:,} parts; the limit is {MAX_MANIFEST_PARTS:,}",
                                  field="manifest_part_shards")

    @classmethod
    def for_spec(cls, spec: JobSpec) -> PartPlan:
        """The plan of ``spec``'s job (its ``manifest_part_shards``, else :func:`part_shards_for`)."""
        part_shards = spec.manifest_part_shards or part_shards_for(spec.shard_size)
        return cls(spec.shard_plan().num_shards, part_shards)

    @property
    def num_parts(self) -> int:
        return -(-self.num_shards // self.part_shards)

    def part_range(self, part: int) -> tuple[int, int]:
        """Shard indices ``[start, stop)`` of ``part``.

        Raises:
            ValidationError: ``part`` out of range.
        """
        if not 0 <= part < self.num_parts:
            raise ValidationError(f"part must be in [0, {self.num_parts}), got {part}")
        start = part * self.part_shards
        return start, min(start + self.part_shards, self.num_shards)

    def part_of_shard(self, shard: int) -> int:
        """The part that holds ``shard``."""
        return int(shard) // self.part_shards


@dataclass(frozen=True)
class PartSummary:
    """What one written part holds (stored as ``_part-NNNNN.json`` after the part).

    Attributes:
        part: the part.
        shards: ``[start, stop)`` shard indices it covers.
        shards_missing: shards of the range without an index when it was built (failed ones).
        rows: rows (items) in the part.
        items_ok: rows with ``status == "ok"``.
        items_failed: the other rows.
        items_failed_by_reason: failed rows per reason.
        item_min: smallest item index (``-1`` when empty).
        item_max: largest item index (``-1`` when empty).
        bytes: size of the part file in bytes.
        sha256: hex sha256 of the part file.
    """

    part: int
    shards: tuple[int, int]
    shards_missing: tuple[int, ...]
    rows: int
    items_ok: int
    items_failed: int
    items_failed_by_reason: dict[str, int] = field(default_factory=dict)
    item_min: int = -1
    item_max: int = -1
    bytes: int = 0
    sha256: str = ""

    @property
    def final(self) -> bool:
        """Every shard of the range was committed: the part never changes again."""
        return not self.shards_missing

    def to_json(self) -> builtins.bytes:  # the field `bytes` shadows the type in the class body
        doc = asdict(self)
        doc["shards"], doc["shards_missing"] = list(self.shards), list(self.shards_missing)
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: builtins.bytes, *, source: str = "part summary") -> PartSummary:
        """Raises: StorageError: not a part summary."""
        try:
            doc = json.loads(data)
            return cls(part=int(doc["part"]), shards=(int(doc["shards"][0]), int(doc["shards"][1])),
                       shards_missing=tuple(int(s) for s in doc["shards_missing"]), rows=int(doc["rows"]),
                       items_ok=int(doc["items_ok"]), items_failed=int(doc["items_failed"]),
                       items_failed_by_reason={str(k): int(v) for k, v in doc["items_failed_by_reason"].items()},
                       item_min=int(doc["item_min"]), item_max=int(doc["item_max"]), bytes=int(doc["bytes"]),
                       sha256=str(doc["sha256"]))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise StorageError(f"{source} is not a genimg part summary: {e}") from e


@dataclass(frozen=True)
class ManifestTotals:
    """Sums over a job's part summaries (what ``_SUCCESS`` reports about the manifest).

    Attributes:
        parts: parts in the manifest.
        parts_written: parts this call built and wrote.
        rows: rows (items) over all parts.
        items_ok: ok rows.
        items_failed: failed rows.
        items_failed_by_reason: failed rows per reason.
        shards_missing: shards of the plan without an index (not in the manifest).
        bytes: bytes of all part files.
    """

    parts: int
    parts_written: int
    rows: int
    items_ok: int
    items_failed: int
    items_failed_by_reason: dict[str, int]
    shards_missing: int
    bytes: int


# --------------------------------------------------------------------------- building parts


def _conform(table: pa.Table, schema: pa.Schema | None) -> pa.Table:
    """``table`` with ``schema``'s columns first (missing ones as nulls), then any others it has."""
    if schema is None:
        return table
    arrays, fields = [], []
    for f in schema:
        arrays.append(table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type))
        fields.append(f)
    for name in table.column_names:
        if name not in schema.names:
            arrays.append(table[name])
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=INDEX_SCHEMA.metadata))


def _read_index_or_none(store: ObjectStore, layout: Layout, shard: int) -> pa.Table | None:
    key = layout.index_key(shard)
    try:
        data = store.get_bytes(key)
    except StorageNotFoundError:
        return None  # not committed (failed, or not yet run)
    return index_from_parquet(data, source=layout.url(key))


def _part_table(store: ObjectStore, layout: Layout, shards: range, schema: pa.Schema | None,
                pool: ThreadPoolExecutor) -> tuple[pa.Table, tuple[int, ...]]:
    """Read the indexes of ``shards`` (in parallel on ``pool``) and de-duplicate them."""
    tables = list(pool.map(lambda s: _read_index_or_none(store, layout, s), shards))
    missing = tuple(s for s, t in zip(shards, tables, strict=True) if t is None)
    present = [_conform(t, schema) for t in tables if t is not None]
    if not present:
        return (schema or INDEX_SCHEMA).empty_table(), missing
    table = pa.concat_tables(present, promote_options="default")
    return dedupe_index(table).combine_chunks(), missing


def _summarise(part: int, shards: range, missing: tuple[int, ...], table: pa.Table, data: bytes) -> PartSummary:
    status, items = table["status"], table["item_index"]
    ok = int(pc.sum(pc.equal(status, STATUS_OK)).as_py() or 0) if table.num_rows else 0
    reasons: Counter[str] = Counter()
    if table.num_rows > ok:
        failed = table.filter(pc.not_equal(status, STATUS_OK))["reason"]
        for row in pc.value_counts(pc.fill_null(failed, "None")).to_pylist():
            reasons[str(row["values"])] += int(row["counts"])
    return PartSummary(
        part=part, shards=(shards.start, shards.stop), shards_missing=missing, rows=table.num_rows,
        items_ok=ok, items_failed=table.num_rows - ok, items_failed_by_reason=dict(sorted(reasons.items())),
        item_min=int(pc.min(items).as_py()) if table.num_rows else -1,
        item_max=int(pc.max(items).as_py()) if table.num_rows else -1,
        bytes=len(data), sha256=sha256_hex(data))


def build_part(store: ObjectStore, layout: Layout, plan: PartPlan, part: int, *, schema: pa.Schema | None = None,
               pool: ThreadPoolExecutor | None = None, write: bool = True) -> tuple[pa.Table, PartSummary]:
    """Build one part from its shards' committed indexes; write it, then its summary, unless ``write=False``.

    Args:
        store: the job's bucket.
        layout: the job's layout.
        plan: the job's part plan.
        part: the part, ``[0, plan.num_parts)``.
        schema: the job's schema (:func:`job_schema`); ``None`` keeps the indexes' own.
        pool: threads for the index reads (default: a pool of :data:`READ_THREADS` for this call).
        write: upload ``part-NNNNN.parquet`` then ``_part-NNNNN.json``.

    Returns:
        The part's rows (sorted by item index, one per item) and its summary.

    Raises:
        ValidationError: ``part`` out of range.
        StorageUnavailableError: a retryable storage fault.
        StorageError: an unreadable index, or another storage fault.
    """
    start, stop = plan.part_range(part)
    own = pool is None
    pool = pool or ThreadPoolExecutor(READ_THREADS, thread_name_prefix="genimg-manifest")
    try:
        table, missing = _part_table(store, layout, range(start, stop), schema, pool)
    finally:
        if own:
            pool.shutdown()
    if write:
        return table, write_part(store, layout, plan, part, table, missing)
    return table, _summarise(part, range(start, stop), missing, table, index_to_parquet(table))


def write_part(store: ObjectStore, layout: Layout, plan: PartPlan, part: int, table: pa.Table,
               shards_missing: tuple[int, ...]) -> PartSummary:
    """Write ``part-NNNNN.parquet`` from ``table`` (its rows, sorted), then its summary (the part's commit marker).

    Raises:
        ValidationError: ``part`` out of range, or a table that is not a manifest.
        StorageUnavailableError: a retryable storage fault.
        StorageError: another storage fault.
    """
    start, stop = plan.part_range(part)
    data = index_to_parquet(table)
    summary = _summarise(part, range(start, stop), shards_missing, table, data)
    store.put_bytes(layout.manifest_part_key(part), data, "application/vnd.apache.parquet")
    store.put_bytes(layout.manifest_summary_key(part), summary.to_json(), "application/json")
    log.info("wrote manifest part job=%s part=%d shards=%d-%d rows=%d missing=%d", layout.job_id, part,
             start, stop - 1, table.num_rows, len(shards_missing))
    return summary


def read_summary(store: ObjectStore, layout: Layout, part: int) -> PartSummary | None:
    """The part's summary, or ``None`` if the part has none (not written, or being rewritten)."""
    key = layout.manifest_summary_key(part)
    try:
        return PartSummary.from_json(store.get_bytes(key, max_bytes=1 << 20), source=layout.url(key))
    except StorageNotFoundError:
        return None


def summarised_parts(store: ObjectStore, layout: Layout) -> list[int]:
    """Parts that have a summary, ascending (one LIST per 1,000 parts)."""
    found = (_SUMMARY_RE.search(k) for k in store.list_keys(f"{layout.manifest_prefix}_part-"))
    return sorted(int(m.group(1)) for m in found if m)


def written_parts(store: ObjectStore, layout: Layout) -> list[int]:
    """Parts that have a Parquet file, ascending."""
    found = (_PART_RE.search(k) for k in store.list_keys(f"{layout.manifest_prefix}part-"))
    return sorted(int(m.group(1)) for m in found if m)


def finalize_parts(store: ObjectStore, layout: Layout, plan: PartPlan, *, schema: pa.Schema | None = None,
                   threads: int = READ_THREADS, parallel_parts: int = BUILD_PARTS) -> ManifestTotals:
    """Write every part that has no final summary, then sum all part summaries.

    Parts compacted by workers (final) are only read back as summaries; a part
    with a shard that had failed is rebuilt (the shard may be committed now).
    At most ``parallel_parts`` parts are in memory at once.

    Raises:
        StorageUnavailableError: a retryable storage fault.
        StorageError: an unreadable index or summary, or another storage fault.
    """
    have = set(summarised_parts(store, layout))
    summaries: dict[int, PartSummary] = {}
    with ThreadPoolExecutor(threads, thread_name_prefix="genimg-manifest") as pool:
        found = pool.map(lambda p: read_summary(store, layout, p), sorted(have))
        for part, summary in zip(sorted(have), found, strict=True):
            if summary is not None and summary.final and part < plan.num_parts \
                    and summary.shards == plan.part_range(part):
                summaries[part] = summary
        todo = [p for p in range(plan.num_parts) if p not in summaries]
        with ThreadPoolExecutor(max(1, parallel_parts), thread_name_prefix="genimg-part") as builders:
            for part, (_, summary) in zip(todo, builders.map(
                    lambda p: build_part(store, layout, plan, p, schema=schema, pool=pool), todo), strict=True):
                summaries[part] = summary
    reasons: Counter[str] = Counter()
    for s in summaries.values():
        reasons.update(s.items_failed_by_reason)
    totals = ManifestTotals(
        parts=plan.num_parts, parts_written=len(todo), rows=sum(s.rows for s in summaries.values()),
        items_ok=sum(s.items_ok for s in summaries.values()),
        items_failed=sum(s.items_failed for s in summaries.values()),
        items_failed_by_reason=dict(sorted(reasons.items())),
        shards_missing=sum(len(s.shards_missing) for s in summaries.values()),
        bytes=sum(s.bytes for s in summaries.values()))
    log.info("manifest finalised job=%s parts=%d written=%d rows=%d", layout.job_id, totals.parts,
             totals.parts_written, totals.rows)
    return totals


def invalidate_parts(store: ObjectStore, layout: Layout, plan: PartPlan, shards: Iterable[int]) -> int:
    """Delete the summaries and files of the parts that hold any of ``shards`` (before they run again).

    Returns:
        The number of parts whose files were deleted.
    """
    parts = sorted({plan.part_of_shard(s) for s in shards})
    have = set(summarised_parts(store, layout)) | set(written_parts(store, layout))
    stale = [p for p in parts if p in have]
    for p in stale:  # the summary (the part's commit marker) first
        store.delete_prefix(layout.manifest_summary_key(p))
        store.delete_prefix(layout.manifest_part_key(p))
    return len(stale)


# --------------------------------------------------------------------------- reading


def read_part(store: ObjectStore, layout: Layout, part: int, schema: pa.Schema | None = None) -> pa.Table:
    """One written part's rows (with ``schema``'s columns first, when given).

    Raises:
        StorageNotFoundError: the part has no file.
        StorageError: not a genimg manifest part, or another storage fault.
    """
    key = layout.manifest_part_key(part)
    return _conform(index_from_parquet(store.get_bytes(key), source=layout.url(key)), schema)


def iter_parts(store: ObjectStore, layout: Layout, plan: PartPlan | None = None, *,
               schema: pa.Schema | None = None, prefetch: int = 2) -> Iterator[pa.Table]:
    """Yield the manifest one part at a time, in item order, reading ahead at most ``prefetch`` parts.

    With ``plan``, a part that has a summary is read from its file, and any
    other part (a running job's) is built from the committed indexes in memory
    (nothing is written). Without ``plan``, the part files that exist are read.

    Raises:
        StorageUnavailableError: a retryable storage fault.
        StorageError: an unreadable part or index, or another storage fault.
    """
    if plan is None:
        sources: list[tuple[int, bool]] = [(p, True) for p in written_parts(store, layout)]
    else:
        have = set(summarised_parts(store, layout))
        sources = [(p, p in have) for p in range(plan.num_parts)]
    reader = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="genimg-manifest")
    ahead = ThreadPoolExecutor(max(1, prefetch), thread_name_prefix="genimg-part")

    def load(part: int, stored: bool) -> pa.Table:
        if stored:
            return read_part(store, layout, part, schema)
        assert plan is not None
        return build_part(store, layout, plan, part, schema=schema, pool=reader, write=False)[0]

    pending: deque[Future[pa.Table]] = deque()
    try:
        todo = iter(sources)
        for part, stored in todo:
            pending.append(ahead.submit(load, part, stored))
            if len(pending) > max(1, prefetch):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        ahead.shutdown(wait=True, cancel_futures=True)
        reader.shutdown(wait=True, cancel_futures=True)


def iter_batches(store: ObjectStore, layout: Layout, plan: PartPlan | None = None, *,
                 schema: pa.Schema | None = None, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The manifest as record batches of at most ``batch_rows`` rows (see :func:`iter_parts`).

    An empty manifest yields one empty batch, so that a writer still learns the schema.
    """
    last: pa.Schema = schema or INDEX_SCHEMA
    yielded = False
    for table in iter_parts(store, layout, plan, schema=schema):
        last = table.schema
        for batch in table.to_batches(max_chunksize=batch_rows):
            yielded = True
            yield batch
    if not yielded:
        yield pa.RecordBatch.from_pylist([], schema=last)


def read_table(store: ObjectStore, layout: Layout, plan: PartPlan | None = None, *,
               schema: pa.Schema | None = None, max_rows: int = TABLE_MAX_ROWS) -> pa.Table:
    """The whole manifest as one table, for jobs of at most ``max_rows`` rows.

    Raises:
        ManifestTooLargeError: more than ``max_rows`` rows (stream with :func:`iter_batches`).
        StorageError: see :func:`iter_parts`.
    """
    tables: list[pa.Table] = []
    rows = 0
    for table in iter_parts(store, layout, plan, schema=schema):
        rows += table.num_rows
        if rows > max_rows:
            raise ManifestTooLargeError(f"the manifest of job {layout.job_id} has more than {max_rows:,} rows; "
                                        f"stream it (Job.iter_manifest, genimg manifest --out) or read "
                                        f"{layout.url(layout.manifest_prefix)} as a dataset", field="max_rows")
        tables.append(table)
    if not tables:
        return (schema or INDEX_SCHEMA).empty_table()
    return pa.concat_tables(tables, promote_options="default").combine_chunks()


def build_manifest(store: ObjectStore, layout: Layout, *, write: bool = True, plan: PartPlan | None = None,
                   schema: pa.Schema | None = None) -> pa.Table:
    """Build every part of a (small) job's manifest and return the rows as one table.

    Only shards with an index are read, so half-written shards never appear.
    Without ``plan``, the shards run up to the highest committed one in parts
    of :func:`part_shards_for` of 1,000-item shards. Parts are written (and
    their summaries) unless ``write=False``. Big jobs use
    :func:`finalize_parts` and :func:`iter_batches` instead.

    Returns:
        One row per item, sorted by item index (:data:`INDEX_SCHEMA` columns first).

    Raises:
        ValidationError: a store for another bucket.
        StorageUnavailableError: a retryable storage fault.
        StorageError: an unreadable index, or another storage fault.
    """
    if store.bucket != layout.bucket:
        raise ValidationError(f"store is for bucket {store.bucket!r}, layout for {layout.bucket!r}")
    if plan is None:
        shards = committed_shards(store, layout)
        plan = PartPlan(shards[-1] + 1 if shards else 0, part_shards_for(1_000))
    tables = []
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="genimg-manifest") as pool:
        for part in range(plan.num_parts):
            tables.append(build_part(store, layout, plan, part, schema=schema, pool=pool, write=write)[0])
    if not tables:
        return (schema or INDEX_SCHEMA).empty_table()
    return pa.concat_tables(tables, promote_options="default").combine_chunks()


__all__ = [
    "BATCH_ROWS", "MAX_PART_SHARDS", "PART_ROWS", "TABLE_MAX_ROWS", "ManifestTooLargeError",
    "ManifestTotals", "PartPlan", "PartSummary", "build_manifest", "build_part",
    "finalize_parts", "invalidate_parts", "iter_batches", "iter_parts", "job_schema", "part_shards_for",
    "read_part", "read_summary", "write_part", "read_table", "summarised_parts", "written_parts",
]
