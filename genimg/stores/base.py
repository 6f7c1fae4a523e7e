"""The object-store seam: what every store offers (:class:`ObjectStore`) and what its writes and HEADs return.

Stores: :class:`genimg.stores.s3.S3Store` (any S3 API) and
:class:`genimg.stores.files.FileStore` (a local directory); open one with
:func:`genimg.stores.open_store`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PutResult:
    """What :meth:`S3Store.put_bytes` wrote.

    Attributes:
        key: object key.
        size_bytes: object size.
        sha256: hex sha256 of the bytes (also stored as metadata ``sha256``).
        multipart: whether the multipart API was used.
    """

    key: str
    size_bytes: int
    sha256: str
    multipart: bool


@dataclass(frozen=True)
class ObjectInfo:
    """Object metadata from a HEAD request.

    Attributes:
        key: object key.
        size_bytes: object size.
        sha256: metadata ``sha256`` (hex), or ``None`` when the writer set none.
        content_type: the stored ``Content-Type``.
        etag: the ETag as returned (not an integrity check).
    """

    key: str
    size_bytes: int
    sha256: str | None
    content_type: str
    etag: str



class ObjectStore(Protocol):
    """The storage seam the shard protocol needs (implemented by ``S3Store`` and ``FileStore``)."""

    bucket: str

    def put_bytes(
        self, key: str, data: bytes, content_type: str = ..., *, metadata: Mapping[str, str] | None = ...
    ) -> PutResult: ...

    def get_bytes(self, key: str, *, max_bytes: int | None = ..., verify_sha256: bool = ...) -> bytes: ...

    def get_range(self, key: str, start: int, length: int) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list_keys(self, prefix: str) -> list[str]: ...

    def delete_prefix(self, prefix: str, *, everything: bool = ...) -> int: ...


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data`` (64 lowercase characters)."""
    return hashlib.sha256(data).hexdigest()


class ManagedStore(ObjectStore, Protocol):
    """An :class:`ObjectStore` that can also be closed (what :func:`genimg.stores.open_store` returns)."""

    def close(self) -> None: ...
