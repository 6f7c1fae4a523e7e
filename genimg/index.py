"""The shard index and manifest table: its columns (:data:`INDEX_SCHEMA`), a profile's metadata columns, and its
deterministic Parquet bytes.

Every shard index and every manifest part is one row per item (ok or failed):
:data:`INDEX_SCHEMA`'s columns, then the job's metadata columns
(:func:`index_schema`). The same rows always give the same bytes (fixed zstd
level, no timestamps: :func:`index_to_parquet`). :func:`dedupe_index` keeps one
row per item index when the manifest reads shards.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genimg.errors import StorageError, ValidationError

STATUS_OK = "ok"
STATUS_FAILED = "failed"

PARQUET_COMPRESSION = "zstd"
PARQUET_COMPRESSION_LEVEL = 3
"""Fixed Parquet codec and level, so index bytes never vary for the same rows."""

INDEX_SCHEMA_VERSION = "3"
"""Version 3 added ``phash``; an index of version 2 reads with a null ``phash`` (:func:`index_from_parquet`)."""

INDEX_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("item_index", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),  # WebDataset __key__: f"{item_index:09d}"
        pa.field("shard_index", pa.int32(), nullable=False),
        pa.field("tar_key", pa.string()),  # bucket-relative key of the shard tar; null if failed
        pa.field("tar_offset", pa.int64()),  # byte offset of the image member's data in the tar
        pa.field("tar_size", pa.int64()),  # byte size of the image member (= encoded image)
        pa.field("prompt", pa.string()),  # null for noise-only jobs
        pa.field("seed", pa.uint64(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # the Triton model or ensemble
        pa.field("model_version", pa.string(), nullable=False),  # content hash of the served model files
        pa.field("profile", pa.string(), nullable=False),  # the model profile's name
        pa.field("params", pa.string(), nullable=False),  # the item's generation parameters, canonical JSON
        pa.field("width", pa.int32()),  # pixels
        pa.field("height", pa.int32()),  # pixels
        pa.field("format", pa.string()),  # png | webp | jpeg
        pa.field("sha256", pa.string()),  # hex sha256 of the encoded image bytes
        pa.field("phash", pa.string()),  # 64-bit perceptual hash of the pixels, 16 hex digits (imagehash.phash)
        pa.field("status", pa.string(), nullable=False),  # ok | failed
        pa.field("reason", pa.string()),  # failure reason, e.g. non_finite_output
        pa.field("infer_s", pa.float64(), nullable=False),  # seconds of inference attributed to the item
        pa.field("encode_s", pa.float64(), nullable=False),  # seconds encoding the item
    ],
    metadata={b"genimg.index_schema": INDEX_SCHEMA_VERSION.encode()},
)
"""The columns every shard index and job manifest has (one row per item); a profile's
metadata columns follow them (:func:`index_schema`)."""

ADDED_COLUMNS = ("phash",)
"""Columns of :data:`INDEX_SCHEMA` that older indexes lack; they read back as nulls."""

DUPLICATE_OF = pa.field("duplicate_of", pa.int64())
"""The manifest column of a job with ``dedup``: the lowest item index of the item's duplicate group, null
when the item has none (:mod:`genimg.dedup`); last in the manifest, never in a shard index."""

METADATA_TYPES = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "str": pa.string()}
"""Arrow type of a profile's metadata column, by its declared type."""


def index_schema(metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """:data:`INDEX_SCHEMA` followed by one nullable column per metadata column.

    Args:
        metadata: column name → declared type (``int``, ``float``, ``bool``, ``str``), in order.

    Raises:
        ValidationError: a name that clashes with an index column or an unknown type.
    """
    schema = INDEX_SCHEMA
    for name, kind in (metadata or {}).items():
        if name in INDEX_SCHEMA.names or kind not in METADATA_TYPES:
            raise ValidationError(f"metadata column {name!r} ({kind}) clashes or has an unknown type")
        schema = schema.append(pa.field(name, METADATA_TYPES[kind]))
    return schema.with_metadata(INDEX_SCHEMA.metadata)



def index_to_parquet(table: pa.Table) -> bytes:
    """Serialise an index/manifest table to Parquet bytes, deterministically.

    Raises:
        ValidationError: the table does not match :data:`INDEX_SCHEMA`.
    """
    base = pa.schema(list(table.schema)[:len(INDEX_SCHEMA)])
    if not base.equals(INDEX_SCHEMA, check_metadata=False):
        raise ValidationError(f"table does not start with INDEX_SCHEMA's columns: {table.schema}")
    sink = io.BytesIO()
    pq.write_table(
        table.replace_schema_metadata(INDEX_SCHEMA.metadata),
        sink,
        compression=PARQUET_COMPRESSION,
        compression_level=PARQUET_COMPRESSION_LEVEL,
        use_dictionary=True,
        write_statistics=True,
        version="2.6",
        data_page_version="1.0",
        row_group_size=1 << 20,
    )
    return sink.getvalue()


def index_from_parquet(data: bytes, *, source: str = "index") -> pa.Table:
    """Read Parquet bytes written by :func:`index_to_parquet`: the :data:`INDEX_SCHEMA` columns, then the rest.

    Raises:
        StorageError: not Parquet, or not a genimg index (missing/mistyped columns).
    """
    try:
        table = pq.read_table(io.BytesIO(data))
        for name in ADDED_COLUMNS:  # an index written before the column existed
            if name not in table.column_names:
                added = INDEX_SCHEMA.field(name)
                table = table.append_column(added, pa.nulls(table.num_rows, added.type))
        extra = [n for n in table.column_names if n not in INDEX_SCHEMA.names]
        schema = pa.schema([*INDEX_SCHEMA, *(table.schema.field(n) for n in extra)], metadata=INDEX_SCHEMA.metadata)
        return table.select([*INDEX_SCHEMA.names, *extra]).cast(schema)
    except (pa.ArrowException, KeyError, ValueError) as e:
        raise StorageError(f"{source} is not a genimg shard index: {e}") from e


def dedupe_index(table: pa.Table) -> pa.Table:
    """One row per item index, sorted by item index.

    When an item appears more than once (e.g. in two shards after a change of
    shard plan), an ``ok`` row wins over a ``failed`` one, then the lowest
    shard index. Deterministic.
    """
    if table.num_rows == 0:
        return table
    items = table["item_index"].to_numpy()
    if bool(np.all(items[1:] > items[:-1])):
        return table  # already one row per item, in order (shards read in order): nothing to sort
    rank = pc.if_else(pc.equal(table["status"], STATUS_OK), 0, 1)
    ranked = table.append_column("__rank", rank)
    order = pc.sort_indices(
        ranked,
        sort_keys=[("item_index", "ascending"), ("__rank", "ascending"), ("shard_index", "ascending")],
    )
    ranked = ranked.take(order)
    item = ranked["item_index"].to_numpy()
    keep = np.ones(len(item), dtype=bool)
    keep[1:] = item[1:] != item[:-1]
    return ranked.filter(pa.array(keep)).drop_columns(["__rank"])
