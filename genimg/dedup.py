"""Duplicates in a job's output: exact (same image sha256) and near (perceptual hashes a few bits apart).

Every finished job is scanned once (:func:`genimg.jobs.finalize_if_complete`),
from the manifest's columns only, one part at a time: ``item_index``,
``status``, ``sha256`` and ``phash`` (:func:`genimg.imaging.phash`, a 64-bit
pHash computed by the worker). The report (:class:`DedupReport`) is written as
``dedup.json`` beside the manifest and summarised in the dataset card. A job
with ``dedup="exact"`` or ``"near"`` also gets a ``duplicate_of`` column in its
manifest: the lowest item index of the item's duplicate group, null for an item
that has no duplicate at a lower index (and for failed items). Nothing is ever
deleted: a reader filters ``duplicate_of IS NULL``.

**Groups.** Exact: items whose encoded images have the same sha256 (compared
on its first 128 bits). Near: the connected components of the graph whose
edges join items with pHashes at most :data:`NEAR_DISTANCE` bits apart
(Hamming distance of 64 bits), so a chain of near pairs is one group; exact
duplicates have equal pHashes, so every exact group lies inside a near group.
Items without a pHash (indexes written before the column existed) take part in
the exact search only.

**Scale.** No pair of items is compared unless a band index puts them together
(Manku, Jain, Das Sarma 2007, "Detecting near-duplicates for web crawling",
WWW '07): the 64 bits are cut into ``b > t`` blocks; two hashes at most ``t``
bits apart agree on at least ``b - t`` whole blocks, so for each choice of
``b - t`` blocks the distinct pHashes are sorted by those bits and only
neighbours with equal keys are compared. ``b`` grows with the number of
distinct hashes so that a key has about log2(n) bits (``b = t + 1``, the
pigeonhole case, for small jobs): the cost is ``C(b, t)`` sorts of the
distinct hashes plus the comparisons inside equal keys, never n². Memory is
about 32 bytes per ok item (10**7 items: ~0.3 GB; 10**8: ~3.2 GB) plus the
sorts' temporaries.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genimg.errors import StorageError, ValidationError
from genimg.index import DUPLICATE_OF, STATUS_OK

log = logging.getLogger(__name__)

NEAR_DISTANCE = 4
"""Default near-duplicate threshold: pHashes at most this many of their 64 bits apart."""
MAX_DISTANCE = 16
"""Largest threshold :func:`find_duplicates` accepts (beyond it pHash matches unrelated images)."""
EXAMPLE_PAIRS = 10
"""Example pairs a report lists, of each kind."""
MODES = ("exact", "near")
"""What a job's ``dedup`` may ask to mark."""
DEDUP_OBJECT = "dedup.json"
"""The report's object name, beside the manifest (``{job_prefix}/dedup.json``)."""
REPORT_MAX_ITEMS = 1_000_000
"""Largest job (items) whose finalisation scans for duplicates when the job did not ask (``dedup``):
~3 s and ~32 bytes per item at 10^6; a bulk job of 10^8 items would spend minutes and GBs."""

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits set differently in ``a`` and ``b`` (uint64 arrays of one shape) → uint8 array of that shape."""
    x = np.ascontiguousarray(np.bitwise_xor(a, b), dtype=np.uint64)
    return _POPCOUNT[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def _hex_u64(strings: pa.Array, start: int = 0) -> np.ndarray:
    """Hex digits ``[start, start + 16)`` of each string of a null-free string array → uint64."""
    part = pc.utf8_slice_codeunits(strings, start, start + 16)
    if isinstance(part, pa.ChunkedArray):
        part = part.combine_chunks()
    if len(part) == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(part.buffers()[1], dtype=np.int32)[part.offset:part.offset + len(part) + 1]
    if not np.all(np.diff(offsets) == 16):
        raise StorageError("a sha256 or phash value in the manifest is not hex of the expected length")
    data = part.buffers()[2].to_pybytes()[offsets[0]:offsets[-1]]
    try:
        return np.frombuffer(bytes.fromhex(data.decode("ascii")), dtype=">u8").astype(np.uint64)
    except ValueError as e:
        raise StorageError(f"a sha256 or phash value in the manifest is not hex: {e}") from e


# --------------------------------------------------------------------------- collecting


class Scan:
    """The manifest's dedup columns, collected part by part (parts in item order).

    ``add`` each part's table (it needs ``item_index``, ``status``, ``sha256`` and,
    when present, ``phash``), then :meth:`find`.
    """

    def __init__(self) -> None:
        self._idx: list[np.ndarray] = []
        self._sha: list[np.ndarray] = []
        self._ph: list[np.ndarray] = []
        self._has: list[np.ndarray] = []

    def add(self, table: pa.Table) -> None:
        """Take the ok rows of one part.

        Raises:
            StorageError: an ok row without a sha256, or a malformed hash.
        """
        ok = table.filter(pc.equal(table["status"], STATUS_OK))
        if ok.num_rows == 0:
            return
        sha = ok["sha256"].combine_chunks()
        if sha.null_count:
            raise StorageError("an ok row of the manifest has no sha256")
        hi, lo = _hex_u64(sha, 0), _hex_u64(sha, 16)
        self._idx.append(ok["item_index"].to_numpy().astype(np.int64))
        self._sha.append(np.stack([hi, lo], axis=1))
        ph = ok["phash"].combine_chunks() if "phash" in ok.column_names else pa.nulls(ok.num_rows, pa.string())
        has = ph.is_valid().to_numpy(zero_copy_only=False)
        values = np.zeros(ok.num_rows, dtype=np.uint64)
        if has.any():
            values[has] = _hex_u64(ph.filter(ph.is_valid()))
        self._ph.append(values)
        self._has.append(has)

    def find(self, max_distance: int = NEAR_DISTANCE) -> Duplicates:
        """Group the collected items (see the module docstring).

        Raises:
            ValidationError: ``max_distance`` outside ``[0, MAX_DISTANCE]``.
        """
        if not 0 <= max_distance <= MAX_DISTANCE:
            raise ValidationError(f"must be in [0, {MAX_DISTANCE}], got {max_distance}", field="max_distance")
        started = time.perf_counter()
        def cat(xs: list[np.ndarray], dtype: Any, shape: tuple[int, ...] = (0,)) -> np.ndarray:
            return np.concatenate(xs) if xs else np.zeros(shape, dtype=dtype)

        idx = cat(self._idx, np.int64)
        sha = cat(self._sha, np.uint64, (0, 2))
        ph = cat(self._ph, np.uint64)
        has = cat(self._has, bool)
        order = np.argsort(idx, kind="stable")
        if not np.array_equal(order, np.arange(len(idx))):
            idx, sha, ph, has = idx[order], sha[order], ph[order], has[order]
        exact = _group_min(idx, np.lexsort((sha[:, 1], sha[:, 0])), sha)
        near = _near_groups(idx, ph, has, max_distance)
        return Duplicates(idx=idx, phash=ph, has_phash=has, exact_of=exact,
                          near_of=np.minimum(exact, near), max_distance=max_distance,
                          seconds=time.perf_counter() - started)


def _group_min(idx: np.ndarray, order: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """For each item, the lowest item index among the items with its key (``keys`` rows, sorted by ``order``)."""
    out = idx.copy()
    if len(idx) < 2:
        return out
    k = keys[order]
    start = np.ones(len(k), dtype=bool)
    start[1:] = np.any(k[1:] != k[:-1], axis=1) if k.ndim == 2 else k[1:] != k[:-1]
    starts = np.flatnonzero(start)
    mins = np.minimum.reduceat(idx[order], starts)
    out[order] = np.repeat(mins, np.diff(np.append(starts, len(k))))
    return out


def _blocks(max_distance: int, distinct: int) -> int:
    """Blocks to cut 64 bits into: more than ``max_distance``, enough that a key has ~log2(distinct) bits."""
    want = min(32.0, math.log2(max(distinct, 2)))
    b = max_distance + 1
    while 64 * (b - max_distance) / b < want and b < max_distance + 4:
        b += 1
    return b


def near_pairs(values: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of distinct uint64 ``values`` at most ``max_distance`` bits apart (band index, module docstring).

    Args:
        values: distinct uint64 hashes, shape ``[n]``.
        max_distance: 0..64 bits.

    Returns:
        ``(i, j)``: int64 arrays of positions into ``values`` with ``i < j``, each pair once.
    """
    n = len(values)
    if n < 2 or max_distance == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    b = _blocks(max_distance, n)
    edges = np.linspace(0, 64, b + 1).round().astype(int)
    masks = [sum(1 << bit for bit in range(edges[k], edges[k + 1])) for k in range(b)]
    found: list[np.ndarray] = []
    for chosen in itertools.combinations(range(b), b - max_distance):
        mask = np.uint64(sum(masks[k] for k in chosen))
        keys = values & mask
        order = np.argsort(keys, kind="stable")
        k_sorted, v_sorted = keys[order], values[order]
        for d in itertools.count(1):  # compare each hash with the next d-th one while their keys agree
            same = np.flatnonzero(k_sorted[:-d] == k_sorted[d:]) if d < n else np.zeros(0, np.int64)
            if len(same) == 0:
                break
            close = same[hamming(v_sorted[same], v_sorted[same + d]) <= max_distance]
            if len(close):
                a, c = order[close], order[close + d]
                found.append(np.minimum(a, c).astype(np.int64) * n + np.maximum(a, c))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.concatenate(found))
    return pairs // n, pairs % n


def _near_groups(idx: np.ndarray, ph: np.ndarray, has: np.ndarray, max_distance: int) -> np.ndarray:
    """For each item, the lowest item index of its near group (itself without a pHash)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    out = idx.copy()
    sel = np.flatnonzero(has)
    if len(sel) < 2:
        return out
    values, node = np.unique(ph[sel], return_inverse=True)
    i, j = near_pairs(values, max_distance)
    m = len(values)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(m, m))
    _, component = connected_components(graph, directed=False)
    item_component = component[node]
    lowest = np.full(component.max() + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(lowest, item_component, idx[sel])
    out[sel] = lowest[item_component]
    return out


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DedupReport:
    """What ``dedup.json`` holds (counts are of ok items).

    Attributes:
        items: ok items scanned.
        items_without_phash: ok items without a pHash (exact search only).
        exact_duplicates: items whose image is byte-identical to one at a lower item index.
        exact_groups: groups of two or more byte-identical images.
        near_distance: the near threshold, in bits of 64.
        near_duplicates: items in a near group (exact duplicates included) that are not its lowest index.
        near_groups: near groups of two or more items.
        exact_examples: up to :data:`EXAMPLE_PAIRS` ``[kept, duplicate]`` item index pairs.
        near_examples: up to :data:`EXAMPLE_PAIRS` ``[kept, duplicate, bits apart]`` of near (not exact)
            duplicates; the bits are those of the two items' pHashes (a chain may exceed the threshold).
        marked: the job's ``dedup`` mode (``duplicate_of`` in the manifest), or ``None``.
        seconds: time the search took (not the manifest reads).
        not_scanned: why the job was not scanned (a job over :data:`REPORT_MAX_ITEMS` items that did not
            ask for ``dedup``; the counts are then 0), else ``None``.
    """

    items: int
    items_without_phash: int
    exact_duplicates: int
    exact_groups: int
    near_distance: int
    near_duplicates: int
    near_groups: int
    exact_examples: list[list[int]] = field(default_factory=list)
    near_examples: list[list[int]] = field(default_factory=list)
    marked: str | None = None
    seconds: float = 0.0
    not_scanned: str | None = None

    @classmethod
    def not_scanned_because(cls, reason: str) -> DedupReport:
        return cls(0, 0, 0, 0, NEAR_DISTANCE, 0, 0, not_scanned=reason)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        if doc["not_scanned"] is None:  # a scanned job's report keeps its keys
            del doc["not_scanned"]
        return doc


@dataclass(frozen=True)
class Duplicates:
    """The groups :meth:`Scan.find` found, over the job's ok items in item order.

    Attributes:
        idx: item indices, ascending, int64 ``[n]``.
        phash: their pHashes (uint64 ``[n]``; 0 where ``has_phash`` is false).
        has_phash: bool ``[n]``.
        exact_of: lowest item index of each item's exact group (the item itself when alone).
        near_of: the same for near groups.
        max_distance: the near threshold used.
        seconds: time of the search.
    """

    idx: np.ndarray
    phash: np.ndarray
    has_phash: np.ndarray
    exact_of: np.ndarray
    near_of: np.ndarray
    max_distance: int
    seconds: float

    def duplicate_of(self, mode: str) -> np.ndarray:
        """Per item, the lowest item index of its group, or -1 when the item is its group's lowest."""
        if mode not in MODES:
            raise ValidationError(f"must be one of {MODES}, got {mode!r}", field="dedup")
        of = self.exact_of if mode == "exact" else self.near_of
        return np.where(of == self.idx, -1, of)

    def report(self, marked: str | None = None) -> DedupReport:
        exact, near = self.exact_of != self.idx, self.near_of != self.idx
        ex = [[int(self.exact_of[k]), int(self.idx[k])] for k in np.flatnonzero(exact)[:EXAMPLE_PAIRS]]
        only_near = np.flatnonzero(near & ~exact)[:EXAMPLE_PAIRS]
        kept = np.searchsorted(self.idx, self.near_of[only_near])
        bits = hamming(self.phash[kept], self.phash[only_near])
        nx = [[int(self.near_of[k]), int(self.idx[k]), int(d)] for k, d in zip(only_near, bits, strict=True)]
        return DedupReport(
            items=len(self.idx), items_without_phash=int((~self.has_phash).sum()),
            exact_duplicates=int(exact.sum()), exact_groups=len(np.unique(self.exact_of[exact])),
            near_distance=self.max_distance, near_duplicates=int(near.sum()),
            near_groups=len(np.unique(self.near_of[near])), exact_examples=ex, near_examples=nx,
            marked=marked, seconds=round(self.seconds, 6))


def find_duplicates(tables: Iterable[pa.Table], max_distance: int = NEAR_DISTANCE) -> Duplicates:
    """Scan manifest parts (in item order) and group their ok items; see :class:`Scan`."""
    scan = Scan()
    for table in tables:
        scan.add(table)
    return scan.find(max_distance)


# --------------------------------------------------------------------------- marking the manifest


def with_duplicate_of(table: pa.Table, dups: Duplicates, mode: str) -> pa.Table:
    """``table`` (a manifest part) with its ``duplicate_of`` column set from ``dups`` (added last if missing)."""
    of = dups.duplicate_of(mode)
    items = table["item_index"].to_numpy()
    pos = np.searchsorted(dups.idx, items)
    pos_ok = np.minimum(pos, max(len(dups.idx) - 1, 0))
    found = (pos < len(dups.idx)) & (dups.idx[pos_ok] == items) if len(dups.idx) else np.zeros(len(items), bool)
    values = np.where(found, of[pos_ok] if len(of) else -1, -1)
    column = pa.array(values, type=DUPLICATE_OF.type, mask=values < 0)
    if DUPLICATE_OF.name in table.column_names:
        return table.set_column(table.column_names.index(DUPLICATE_OF.name), DUPLICATE_OF, column)
    return table.append_column(DUPLICATE_OF, column)


def mark_parts(parts: Iterable[int], dups: Duplicates, mode: str, *, read: Callable[[int], pa.Table],
               write: Callable[[int, pa.Table], Any], lock: Callable[[int], AbstractContextManager[Any]]) -> int:
    """Set ``duplicate_of`` in each manifest part; rewrite only the parts whose column changes.

    Args:
        parts: the parts to mark.
        dups: the groups found.
        mode: ``"exact"`` or ``"near"``.
        read: part → its rows (:func:`genimg.manifest.read_part`).
        write: ``(part, rows)`` → writes the part, then its summary (:func:`genimg.manifest.write_part`).
        lock: part → a context manager held while the part is read and rewritten (a worker
            compacting the same part waits, and vice versa).

    Returns:
        Parts rewritten.

    Raises:
        ValidationError: an unknown mode.
        StorageUnavailableError: a retryable storage fault.
        StorageError: another storage fault.
    """
    written = 0
    for part in parts:
        with lock(part):
            table = read(part)
            marked = with_duplicate_of(table, dups, mode)
            name = DUPLICATE_OF.name
            if name in table.column_names and table[name].equals(marked[name]):
                continue
            write(part, marked)
            written += 1
    return written
