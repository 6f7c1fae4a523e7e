"""Verify a job's manifest against its shard tars: every ok item's sha256 over the bytes it points at."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from genimg.errors import StorageError, StorageNotFoundError, StorageUnavailableError, ValidationError
from genimg.index import STATUS_OK
from genimg.layout import Layout
from genimg.manifest import iter_parts
from genimg.stores.base import ObjectStore, sha256_hex


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify_manifest`.

    Attributes:
        checked: ok items whose bytes were read and hashed.
        problems: one line per mismatch or missing object (empty when all good).
    """

    checked: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_manifest(store: ObjectStore, layout: Layout, manifest: pa.Table | None = None, *,
                    ranged: bool = True) -> VerifyReport:
    """Check every ok item's sha256 against the bytes at its ``tar_offset``/``tar_size``.

    Args:
        store: the job's bucket.
        layout: the job's layout.
        manifest: the rows to check; ``None`` streams the written parts one at a time.
        ranged: one ranged GET per item (what a reader does); ``False``
            downloads each tar once and slices it (fewer requests).

    Returns:
        Items checked and the problems found.

    Raises:
        StorageUnavailableError: a retryable storage fault.
        StorageError: another storage fault.
    """
    if store.bucket != layout.bucket:
        raise ValidationError(f"store is for bucket {store.bucket!r}, layout for {layout.bucket!r}")
    tables: Iterable[pa.Table] = [manifest] if manifest is not None else iter_parts(store, layout)
    checked, problems = 0, []
    for table in tables:
        rows = table.filter(pc.equal(table["status"], STATUS_OK)).select(
            ["item_index", "tar_key", "tar_offset", "tar_size", "sha256"]).to_pylist()
        rows.sort(key=lambda r: (r["tar_key"], r["tar_offset"]))
        checked += len(rows)
        problems += _verify_rows(store, rows, ranged)
    return VerifyReport(checked=checked, problems=problems)


def _verify_rows(store: ObjectStore, rows: list[dict[str, Any]], ranged: bool) -> list[str]:
    problems: list[str] = []
    current_key, current_tar = None, b""  # ranged=False keeps one tar in memory at a time
    for row in rows:
        tar_key, offset, size = row["tar_key"], row["tar_offset"], row["tar_size"]
        try:
            if ranged:
                data = store.get_range(tar_key, offset, size)
            else:
                if tar_key != current_key:
                    current_key, current_tar = tar_key, b""
                    current_tar = store.get_bytes(tar_key)
                data = current_tar[offset : offset + size]
        except StorageUnavailableError:
            raise
        except StorageNotFoundError:
            problems.append(f"item {row['item_index']}: {tar_key} is missing")
            continue
        except StorageError as e:
            problems.append(f"item {row['item_index']}: {e}")
            continue
        if sha256_hex(data) != row["sha256"]:
            problems.append(f"item {row['item_index']}: sha256 mismatch in {tar_key} at {offset}+{size}")
    return problems
