"""A local-directory object store for ``file://`` outputs (the :class:`~genimg.stores.base.ObjectStore` seam).

:class:`FileStore` maps keys to files under one root directory, so the shard
protocol, the producer and the manifest work unchanged on a laptop disk or a
shared filesystem:

- writes are atomic: bytes go to a hidden temporary file in the target
  directory, are flushed (``fsync``), then ``os.replace``-d over the key, so a
  reader sees the old or the new object, never a mix, and a crash leaves at
  most a temporary file that :meth:`FileStore.list_keys` ignores;
- keys are relative paths of ``A-Za-z0-9 . _ - = + @ ,`` segments; ``..``,
  ``.``, empty segments and absolute keys are refused, so no key escapes the
  root;
- the sha256 is computed from the bytes on demand (there is no metadata to
  go stale).

Errors are genimg's: a missing file is :class:`StorageNotFoundError`, any
other ``OSError`` a :class:`StorageError`.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from genimg.closing import Closing
from genimg.errors import PayloadTooLargeError, StorageError, StorageNotFoundError, ValidationError
from genimg.stores.base import ObjectInfo, PutResult, sha256_hex
from genimg.urls import SEGMENT_RE

logger = logging.getLogger(__name__)

LOCAL_BUCKET = "local"
"""The ``bucket`` name every :class:`FileStore` reports (a valid S3 name, so
:class:`genimg.layout.Layout` accepts it); the root directory is what differs."""

_TMP_MARK = ".genimg-tmp-"


def _is_temporary(name: str) -> bool:
    return name.startswith(_TMP_MARK)


class FileStore(Closing):
    """Objects as files under ``root`` (created on :meth:`ensure_bucket` or first write).

    Args:
        root: the directory that holds every key.
        durable: ``fsync`` each file (and its directory) before it becomes
            visible; switch off only for scratch data.
    """

    bucket: str = LOCAL_BUCKET

    def __init__(self, root: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.root = Path(root).resolve()
        self.durable = durable

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    def close(self) -> None:
        """Nothing to release (kept for symmetry with :class:`~genimg.stores.s3.S3Store`)."""

    def url(self, key: str) -> str:
        """``file:///root/key`` for ``key``."""
        return f"file://{self._path(key).as_posix()}"

    def ensure_bucket(self) -> None:
        """Create the root directory unless it exists.

        Raises:
            StorageError: it cannot be created.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create {self.root}: {e.strerror}") from e

    # ---- keys

    def _path(self, key: str) -> Path:
        if not isinstance(key, str) or not key or key.startswith("/") or key.endswith("/"):
            raise ValidationError(f"invalid key {key!r}", field="key")
        parts = key.split("/")
        for part in parts:
            if part in ("", ".", "..") or not SEGMENT_RE.match(part) or _is_temporary(part):
                raise ValidationError(f"invalid key {key!r}: bad segment {part!r}", field="key")
        return self.root.joinpath(*parts)

    # ---- writing

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream", *,
                  metadata: Mapping[str, str] | None = None) -> PutResult:
        """Write ``data`` to ``key`` atomically (temporary file, fsync, ``os.replace``).

        ``content_type`` and ``metadata`` are accepted for interface parity and
        not stored.

        Raises:
            ValidationError: an invalid key.
            StorageError: the filesystem refused (full disk, permissions, ...).
        """
        path = self._path(key)
        data = bytes(data)
        tmp = path.with_name(f"{_TMP_MARK}{path.name}.{uuid.uuid4().hex}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self.durable:
                self._fsync_dir(path.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"put {key}: {e.strerror or e}") from e
        digest = sha256_hex(data)
        logger.debug("put key=%s bytes=%d sha256=%s", key, len(data), digest)
        return PutResult(key=key, size_bytes=len(data), sha256=digest, multipart=False)

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:  # some filesystems do not open directories; the data is synced already
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    # ---- reading

    def get_bytes(self, key: str, *, max_bytes: int | None = None, verify_sha256: bool = False) -> bytes:
        """Read a whole object (``verify_sha256`` is a no-op: no separate digest is stored).

        Raises:
            StorageNotFoundError: no such key.
            PayloadTooLargeError: the object is larger than ``max_bytes``.
            StorageError: any other filesystem error.
        """
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if max_bytes is not None:
                    size = os.fstat(f.fileno()).st_size
                    if size > max_bytes:
                        raise PayloadTooLargeError(f"{key} is {size} bytes, above max_bytes={max_bytes}")
                return f.read()
        except OSError as e:
            raise self._translate(e, f"get {key}") from e

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Read ``length`` bytes of an object starting at byte ``start``.

        Raises:
            ValidationError: negative ``start`` or ``length``.
            StorageNotFoundError: no such key.
            StorageError: the range runs past the end of the object, or another error.
        """
        if start < 0 or length < 0:
            raise ValidationError(f"bad range start={start} length={length}")
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(length)
        except OSError as e:
            raise self._translate(e, f"get {key} [{start}, +{length})") from e
        if len(data) != length:
            raise StorageError(f"get {key}: asked for {length} bytes at {start}, got {len(data)}")
        return data

    def head(self, key: str) -> ObjectInfo:
        """Size and sha256 (computed from the bytes) of an object.

        Raises:
            StorageNotFoundError: no such key.
            StorageError: any other filesystem error.
        """
        data = self.get_bytes(key)
        return ObjectInfo(key=key, size_bytes=len(data), sha256=sha256_hex(data),
                          content_type="application/octet-stream", etag="")

    def exists(self, key: str) -> bool:
        """Whether ``key`` is a file."""
        return self._path(key).is_file()

    def list_keys(self, prefix: str, *, page_size: int = 1000) -> list[str]:
        """Every key starting with ``prefix`` (plain string prefix, as in S3), sorted.

        Temporary files of unfinished writes are never listed.

        Raises:
            StorageError: the directory cannot be read.
        """
        del page_size  # S3 parity
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = self.root.joinpath(*base.split("/")) if base else self.root
        if not top.is_dir():
            return []
        keys: list[str] = []
        try:
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = [d for d in dirnames if not _is_temporary(d)]
                rel = Path(dirpath).relative_to(self.root).as_posix()
                stem = "" if rel == "." else f"{rel}/"
                keys.extend(f"{stem}{name}" for name in filenames
                            if not _is_temporary(name) and f"{stem}{name}".startswith(prefix))
        except OSError as e:
            raise StorageError(f"list {prefix!r}: {e.strerror}") from e
        return sorted(keys)

    # ---- deleting

    def delete_prefix(self, prefix: str, *, everything: bool = False) -> int:
        """Delete every object under ``prefix`` and the directories it leaves empty.

        Returns:
            The number of objects deleted.

        Raises:
            ValidationError: empty prefix without ``everything``.
            StorageError: a file could not be removed.
        """
        if not prefix and not everything:
            raise ValidationError("refusing to delete the whole store without everything=True", field="prefix")
        deleted = 0
        dirs: set[Path] = set()
        for key in self.list_keys(prefix):
            path = self._path(key)
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StorageError(f"delete {key}: {e.strerror}") from e
            deleted += 1
            dirs.update(p for p in path.parents if p != self.root and self.root in p.parents)
        for directory in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            try:
                directory.rmdir()
            except OSError:  # not empty (other keys, or a writer's temporary file): keep it
                pass
        logger.debug("deleted prefix=%s objects=%d", prefix, deleted)
        return deleted

    @staticmethod
    def _translate(e: OSError, what: str) -> StorageError:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return StorageNotFoundError(f"{what}: not found")
        if e.errno == errno.EISDIR:
            return StorageNotFoundError(f"{what}: is a directory, not an object")
        return StorageError(f"{what}: {e.strerror or e}")
