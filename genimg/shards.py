"""The shard protocol: a deterministic WebDataset tar, then its stats, then its Parquet index (:mod:`genimg.index`)
written last as the commit marker.

Output layout under ``s3://{bucket}/{prefix}/{job_id}/`` (see :class:`genimg.layout.Layout`)::

    shards/000042.tar          WebDataset tar: 000004200.png + 000004200.json, ...
    shards/000042.stats.json   items ok/failed, seconds per stage, sizes
    shards/000042.parquet      the shard index: one row per item, ok or failed
    manifest/part-00000.parquet  committed shard indexes of a range of shards, one row per item
                               (see :mod:`genimg.manifest`)

**Keys.** Inside a tar an item's members are ``{item_index:09d}.{ext}`` and
``{item_index:09d}.json``; WebDataset splits a member name at its first dot,
so the sample key (``__key__``) is the 9-digit item index, unique within a job
because item indices are global ``[0, N)``. The ``key`` column of the index
holds that same string; ``shard_index``/``tar_key`` say which tar holds it.

**Commit protocol.** :func:`commit_shard` uploads the tar, then the stats,
then the index. The index is the commit marker: a shard is committed iff its
index exists (:func:`is_committed`), and the manifest (:mod:`genimg.manifest`)
reads committed indexes only. A crash before the index leaves an uncommitted shard that a
retry overwrites.

**Determinism.** The same items give a byte-identical tar (members sorted by
item index, mtime 0, uid/gid 0, empty user/group names, mode 0o644, USTAR) and
byte-identical index Parquet (fixed zstd level, no timestamps). The per-item
JSON in the tar carries only content (no timings), so a retried shard's tar is
identical even though its timings differ; timings live in the index
(``infer_s``, ``encode_s``) and the stats JSON.

**Item JSON** (:meth:`ShardItem.json_metadata`): every number in it is exact
in every JSON reader (JavaScript's numbers included): the uint64 ``seed`` is a
decimal string, and so is any other integer beyond ±(2**53 - 1); keys without
a value are left out. The index keeps ``seed`` as ``uint64``. ``phash`` is in
the index only (it depends on the resampler and DCT of the worker's libraries;
the tar depends on the pixels alone).

**Failed items** (e.g. reason ``non_finite_output``) are rows with
``status="failed"`` and a ``reason`` in the index, and have no tar members.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from genimg.errors import ValidationError
from genimg.imaging import EXTENSIONS, FORMATS
from genimg.index import INDEX_SCHEMA, STATUS_FAILED, STATUS_OK, index_from_parquet, index_to_parquet
from genimg.layout import Layout
from genimg.limits import MAX_SAFE_INTEGER
from genimg.profiles.params import params_json
from genimg.stores.base import ObjectStore, sha256_hex

logger = logging.getLogger(__name__)

ITEM_KEY_DIGITS = 9
"""Digits of an item key: item indices are below 10**9."""

MAX_ITEM_INDEX = 10**ITEM_KEY_DIGITS - 1
_PHASH_RE = re.compile(r"^[0-9a-f]{16}$")


def item_key(item_index: int) -> str:
    """The WebDataset key of an item: its index as 9 digits (``42`` → ``"000000042"``)."""
    return f"{item_index:0{ITEM_KEY_DIGITS}d}"


# --------------------------------------------------------------------------- items


@dataclass(frozen=True, kw_only=True)
class ShardItem:
    """One item's outcome, as the worker hands it to the shard writer.

    An ``ok`` item has ``image`` (encoded bytes), ``format``, ``width`` and
    ``height``; a ``failed`` item has ``reason`` and no image.

    Attributes:
        item_index: global index in ``[0, 10**9)``.
        seed: the seed of the item's image, ``[0, 2**64)``: its derived seed, or with ``keep_if`` the kept
            attempt's (:func:`genimg.seeds.attempt_seed`).
        model: Triton model (ensemble) name.
        model_version: content hash of the served model files (or Triton's version).
        profile: the model profile's name.
        params: the item's generation parameters (JSON values).
        prompt: text prompt, or ``None`` for noise-only jobs.
        negative_prompt: the job's negative prompt, if any.
        image: encoded image bytes (``None`` when failed).
        format: ``png``, ``webp`` or ``jpeg``.
        width: image width in pixels.
        height: image height in pixels.
        extra: the profile's metadata columns (JSON values; ``None`` where unknown).
        phash: 64-bit perceptual hash of the pixels as 16 lowercase hex digits
            (:func:`genimg.imaging.phash`); index only, never in the item JSON; ``None`` when failed or unknown.
        reason: failure reason (e.g. ``non_finite_output``); ``None`` when ok.
        infer_s: seconds of inference attributed to this item.
        encode_s: seconds spent encoding this item.

    Raises:
        ValidationError: inconsistent or out-of-range fields.
    """

    item_index: int
    seed: int
    model: str
    model_version: str
    profile: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    negative_prompt: str | None = None
    image: bytes | None = None
    format: str | None = None
    width: int | None = None
    height: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    phash: str | None = None
    reason: str | None = None
    infer_s: float = 0.0
    encode_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.item_index <= MAX_ITEM_INDEX:
            raise ValidationError(f"item index must be in 0..{MAX_ITEM_INDEX}, got {self.item_index}")
        if not 0 <= self.seed < 2**64:
            raise ValidationError(f"seed must be in [0, 2**64), got {self.seed}", field="seed")
        for name, value in self.extra.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValidationError(f"item {self.item_index}: metadata {name} must be finite, got {value}")
        if self.phash is not None and not _PHASH_RE.match(self.phash):
            raise ValidationError(f"item {self.item_index}: phash must be 16 lowercase hex digits, got "
                                  f"{self.phash[:40]!r}", field="phash")
        if self.infer_s < 0 or self.encode_s < 0:
            raise ValidationError(f"item {self.item_index}: negative timings")
        if self.image is None:
            if self.phash is not None:
                raise ValidationError(f"item {self.item_index}: an item without an image has no phash")
            if not self.reason:
                raise ValidationError(f"item {self.item_index}: an item without an image needs a reason")
        else:
            if self.reason:
                raise ValidationError(f"item {self.item_index}: an item with an image cannot have a reason")
            if self.format not in FORMATS:
                raise ValidationError(f"item {self.item_index}: format must be one of {FORMATS}", field="format")
            if not (self.width and self.height and self.width > 0 and self.height > 0):
                raise ValidationError(f"item {self.item_index}: width and height must be positive")

    @property
    def ok(self) -> bool:
        """Whether the item has an image."""
        return self.image is not None

    @property
    def key(self) -> str:
        """WebDataset key, ``f"{item_index:09d}"``."""
        return item_key(self.item_index)

    def metadata(self, job_id: str) -> dict[str, Any]:
        """The item's content fields, with Python values (the seed an int): what the index and the JSON share."""
        meta = {
            "job_id": job_id,
            "item_index": self.item_index,
            "key": self.key,
            "prompt": self.prompt,
            "seed": self.seed,
            "model": self.model,
            "model_version": self.model_version,
            "profile": self.profile,
            "params": dict(self.params),
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "sha256": sha256_hex(self.image) if self.image is not None else None,
            **self.extra,
        }
        if self.negative_prompt is not None:
            meta["negative_prompt"] = self.negative_prompt
        return meta

    def json_metadata(self, job_id: str) -> dict[str, Any]:
        """The per-item JSON stored in the tar: content only, no timings (deterministic).

        Every number in it is exact in every JSON reader, JavaScript's included
        (:data:`MAX_SAFE_INTEGER`): ``seed`` is a decimal string (it is a uint64), and
        any other integer beyond ±(2**53 - 1) (a metadata value) is one too. The
        index keeps them as integers. Keys without a value (``prompt`` of a noise job, a
        non-finite score) are left out rather than written as ``null``, which batch
        collation (torch's ``default_collate``) cannot stack.
        """
        return json_safe(self.metadata(job_id))


def json_safe(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` as every JSON reader holds it exactly (the item JSON; ``genimg manifest --out x.jsonl``).

    ``seed`` becomes a decimal string (a uint64, usually beyond 2**53), as does any other integer
    beyond ±:data:`~genimg.limits.MAX_SAFE_INTEGER`; keys whose value is ``None`` are left out.
    """
    out: dict[str, Any] = {}
    for key, value in row.items():
        if value is None:
            continue
        if key == "seed" or (isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SAFE_INTEGER):
            value = str(value)
        out[key] = value
    return out


# --------------------------------------------------------------------------- building a shard


@dataclass(frozen=True)
class ShardPayload:
    """A built shard: what :func:`commit_shard` uploads.

    Attributes:
        shard_index: the shard.
        tar_bytes: the WebDataset tar.
        index: the shard index rows (:data:`INDEX_SCHEMA`), sorted by item index.
        index_bytes: ``index`` as Parquet.
        counts: ``{"items", "items_ok", "items_failed", "image_bytes"}``.
        failed_by_reason: failed item count per reason.
        seconds: summed ``infer`` and ``encode`` seconds over items.
    """

    shard_index: int
    tar_bytes: bytes
    index: pa.Table
    index_bytes: bytes
    counts: dict[str, int]
    failed_by_reason: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


_ZEROS = bytes(tarfile.RECORDSIZE)
_HEADER = _tarinfo("", 0).tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
"""A member's USTAR header with an empty name and size 0; :func:`_header` fills in both and the checksum."""
_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)


def _header(name: str, size: int) -> bytes:
    """The header ``tarfile`` writes for :func:`_tarinfo` ``(name, size)`` in USTAR format, built from
    :data:`_HEADER` (a tenth of the CPU); names that need ``tarfile``'s handling (over 100 bytes, not
    ASCII) and sizes of 8 GiB or more take its own path."""
    if len(name) > 100 or not name.isascii() or "\0" in name or size >= 8 ** 11:
        return _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    buf = bytearray(_HEADER)
    buf[_NAME] = name.encode("ascii").ljust(100, b"\0")
    buf[_SIZE] = b"%011o\0" % size
    buf[_CHKSUM] = b"        "
    buf[_CHKSUM] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def write_tar(members: Iterable[tuple[str, bytes]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Write a deterministic USTAR archive in memory.

    Every member has mtime 0, uid/gid 0, empty user/group names and mode
    0o644; members are written in the order given. The bytes are exactly what
    ``tarfile`` writes for these members (its header, the data padded with NULs
    to 512 bytes, two NUL blocks, NULs up to a 10,240-byte record); the
    archive is assembled here rather than through ``TarFile.addfile``, which
    builds every header twice and copies every member through a file object
    (that was about a third of a worker's CPU outside PNG encoding).

    Args:
        members: ``(name, data)`` pairs; names of at most 100 ASCII characters.

    Returns:
        The tar bytes, and for each name the ``(offset, size)`` in bytes of its
        data inside the tar (for ranged reads).

    Raises:
        ValidationError: a name that USTAR cannot hold, or a repeated name.
    """
    parts: list[bytes] = []
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, data in members:
        if name in spans:
            raise ValidationError(f"duplicate tar member {name!r}")
        try:
            header = _header(name, len(data))
        except ValueError as e:
            raise ValidationError(f"tar member name {name!r}: {e}") from e
        offset += len(header)
        spans[name] = (offset, len(data))
        pad = -len(data) % tarfile.BLOCKSIZE
        parts += (header, data, _ZEROS[:pad])
        offset += len(data) + pad
    end = 2 * tarfile.BLOCKSIZE
    end += -(offset + end) % tarfile.RECORDSIZE
    parts.append(bytes(end))
    return b"".join(parts), spans



class ShardWriter:
    """Collects a shard's items (in any order) and builds its tar and index.

    Args:
        layout: the job's layout (gives the job id and the tar key).
        shard_index: the shard, ``0..999999``.
        schema: the index schema (:func:`index_schema` of the profile's metadata columns);
            default :data:`INDEX_SCHEMA`.
    """

    def __init__(self, layout: Layout, shard_index: int, schema: pa.Schema | None = None) -> None:
        layout.tar_key(shard_index)  # validates the index
        self.layout = layout
        self.shard_index = shard_index
        self.schema = schema if schema is not None else INDEX_SCHEMA
        self._items: dict[int, ShardItem] = {}

    def add(self, item: ShardItem) -> None:
        """Add one item.

        Raises:
            ValidationError: the item index was already added.
        """
        if item.item_index in self._items:
            raise ValidationError(f"item {item.item_index} added twice to shard {self.shard_index}")
        self._items[item.item_index] = item

    def __len__(self) -> int:
        return len(self._items)

    def build(self) -> ShardPayload:
        """Build the tar (ok items only) and the index (all items), sorted by item index."""
        items = [self._items[i] for i in sorted(self._items)]
        job_id = self.layout.job_id
        tar_key = self.layout.tar_key(self.shard_index)

        members: list[tuple[str, bytes]] = []
        for item in items:
            if item.image is None:
                continue
            doc = json.dumps(item.json_metadata(job_id), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            members.append((f"{item.key}.{EXTENSIONS[str(item.format)]}", item.image))
            members.append((f"{item.key}.json", doc.encode("utf-8")))
        tar_bytes, spans = write_tar(members)

        schema = self.schema
        rows: dict[str, list[Any]] = {name: [] for name in schema.names}
        for item in items:
            unknown = set(item.extra) - set(schema.names)
            if unknown:
                raise ValidationError(f"item {item.item_index}: metadata {sorted(unknown)} has no index column")
            span = spans.get(f"{item.key}.{EXTENSIONS[str(item.format)]}") if item.ok else None
            meta = item.metadata(job_id)
            values = {
                **{k: meta[k] for k in ("job_id", "item_index", "key", "prompt", "seed", "model", "model_version",
                                        "profile")},
                "params": params_json(item.params),
                "shard_index": self.shard_index,
                "tar_key": tar_key if item.ok else None,
                "tar_offset": span[0] if span else None,
                "tar_size": span[1] if span else None,
                **{k: meta[k] for k in ("width", "height", "format", "sha256")},
                "phash": item.phash,
                "status": STATUS_OK if item.ok else STATUS_FAILED,
                "reason": item.reason,
                "infer_s": float(item.infer_s),
                "encode_s": float(item.encode_s),
            }
            for name in schema.names:
                rows[name].append(values[name] if name in values else item.extra.get(name))
        index = pa.Table.from_pydict(rows, schema=schema)
        ok = [i for i in items if i.ok]
        return ShardPayload(
            shard_index=self.shard_index,
            tar_bytes=tar_bytes,
            index=index,
            index_bytes=index_to_parquet(index),
            counts={
                "items": len(items),
                "items_ok": len(ok),
                "items_failed": len(items) - len(ok),
                "image_bytes": sum(len(i.image or b"") for i in ok),
            },
            failed_by_reason=dict(sorted(Counter(str(i.reason) for i in items if not i.ok).items())),
            seconds={
                "infer": float(sum(i.infer_s for i in items)),
                "encode": float(sum(i.encode_s for i in items)),
            },
        )


def build_shard(layout: Layout, shard_index: int, items: Iterable[ShardItem],
                schema: pa.Schema | None = None) -> ShardPayload:
    """Build a shard's tar and index from its items (any order); see :class:`ShardWriter`.

    Raises:
        ValidationError: a repeated item index, an invalid shard index, or metadata without a column.
    """
    writer = ShardWriter(layout, shard_index, schema)
    for item in items:
        writer.add(item)
    return writer.build()


# --------------------------------------------------------------------------- committing


@dataclass(frozen=True)
class ShardCommit:
    """The result of :func:`commit_shard`.

    Attributes:
        shard_index: the shard.
        tar_key: key of the tar written.
        index_key: key of the index written (the commit marker).
        stats: the stats JSON written (as a dict).
    """

    shard_index: int
    tar_key: str
    index_key: str
    stats: dict[str, Any]


def _check_bucket(store: ObjectStore, layout: Layout) -> None:
    if store.bucket != layout.bucket:
        raise ValidationError(f"store is for bucket {store.bucket!r}, layout for {layout.bucket!r}")


def commit_shard(
    store: ObjectStore,
    layout: Layout,
    shard_index: int,
    items: Iterable[ShardItem] | ShardPayload,
    *,
    stage_seconds: Mapping[str, float] | None = None,
    schema: pa.Schema | None = None,
    extra_stats: Mapping[str, Any] | None = None,
) -> ShardCommit:
    """Upload a shard: the tar, then the stats JSON, then the index (the commit marker) last.

    Idempotent: a retry with the same items overwrites the tar and index with
    identical bytes. If any upload fails the index is not written, so the
    shard stays uncommitted (:func:`is_committed` is False).

    Args:
        store: the job's bucket.
        layout: the job's layout.
        shard_index: the shard.
        items: the shard's items (any order), or a payload from :func:`build_shard`.
        stage_seconds: extra seconds per stage for the stats (e.g. ``{"shard": 12.5}``);
            ``infer``/``encode`` are summed from the items and ``upload`` measured here
            unless given.
        schema: the index schema when ``items`` are items (:func:`index_schema`).
        extra_stats: more top-level keys for the stats JSON (JSON values), e.g. the
            ``keep_if`` block of :func:`genimg.pipeline.keep_if_stats`.

    Returns:
        Keys written and the stats.

    Raises:
        ValidationError: invalid items, or a store for another bucket.
        StorageUnavailableError: a retryable storage fault (retry the shard).
        StorageError: any other storage fault.
    """
    _check_bucket(store, layout)
    payload = items if isinstance(items, ShardPayload) else build_shard(layout, shard_index, items, schema)
    if payload.shard_index != shard_index:
        raise ValidationError(f"payload is for shard {payload.shard_index}, not {shard_index}")
    tar_key, index_key = layout.tar_key(shard_index), layout.index_key(shard_index)

    started = time.perf_counter()
    tar_put = store.put_bytes(tar_key, payload.tar_bytes, "application/x-tar")
    upload_s = time.perf_counter() - started

    seconds = {**payload.seconds, "upload": upload_s, **dict(stage_seconds or {})}
    stats: dict[str, Any] = {
        "job_id": layout.job_id,
        "shard_index": shard_index,
        **payload.counts,
        "failed_by_reason": payload.failed_by_reason,
        "seconds": {k: round(float(v), 6) for k, v in sorted(seconds.items())},
        "tar_key": tar_key,
        "tar_bytes": tar_put.size_bytes,
        "tar_sha256": tar_put.sha256,
        "index_key": index_key,
        **dict(extra_stats or {}),
    }
    stats_bytes = json.dumps(stats, sort_keys=True, separators=(",", ":")).encode("utf-8")
    store.put_bytes(layout.stats_key(shard_index), stats_bytes, "application/json")
    store.put_bytes(index_key, payload.index_bytes, "application/vnd.apache.parquet")
    logger.info(
        "committed shard job=%s shard=%d ok=%d failed=%d tar_bytes=%d",
        layout.job_id,
        shard_index,
        payload.counts["items_ok"],
        payload.counts["items_failed"],
        tar_put.size_bytes,
    )
    return ShardCommit(shard_index=shard_index, tar_key=tar_key, index_key=index_key, stats=stats)


def is_committed(store: ObjectStore, layout: Layout, shard_index: int) -> bool:
    """Whether the shard's index (its commit marker) exists.

    Raises:
        StorageUnavailableError: a retryable storage fault.
        StorageError: any other storage fault.
    """
    return store.exists(layout.index_key(shard_index))


def committed_shards(store: ObjectStore, layout: Layout) -> list[int]:
    """Indices of the job's committed shards, ascending (one LIST of the shards prefix).

    Raises:
        StorageUnavailableError: a retryable storage fault.
        StorageError: any other storage fault.
    """
    found = (layout.shard_of_index_key(k) for k in store.list_keys(layout.shards_prefix))
    return sorted(s for s in found if s is not None)


def read_shard_index(store: ObjectStore, layout: Layout, shard_index: int) -> pa.Table:
    """One committed shard's index as an :data:`INDEX_SCHEMA` table.

    Raises:
        StorageNotFoundError: the shard is not committed.
        StorageError: the object is not a genimg index, or another storage fault.
    """
    key = layout.index_key(shard_index)
    return index_from_parquet(store.get_bytes(key), source=layout.url(key))
