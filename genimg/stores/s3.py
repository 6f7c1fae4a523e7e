"""S3-compatible object storage: :class:`S3Store`, one bucket through a boto3 client configured for any S3 API.

The only genimg module that talks to botocore (its client is configured in
:mod:`genimg.stores.s3_client`). Every botocore/boto3 error is translated here,
with ``raise ... from e``:

* 5xx, ``SlowDown`` and other throttling codes, connection/read failures →
  :class:`~genimg.errors.StorageUnavailableError` (retry later);
* ``NoSuchKey``, ``NoSuchBucket``, HTTP 404 → :class:`~genimg.errors.StorageNotFoundError`;
* anything else → :class:`~genimg.errors.StorageError`.

Integrity is by sha256 of the bytes, stored as user metadata ``sha256`` on
every object written; ETags are never used for integrity (a multipart ETag is
not an MD5 of the object).

Secrets (case C7): each store registers its credentials with
:mod:`genimg.redaction`, whose filter is attached to every botocore, boto3,
s3transfer and urllib3 logger, so even at DEBUG the ``Authorization`` header,
signatures, access key ids, secret keys and session tokens are redacted.

Create an :class:`S3Store` per process, after any fork (boto3 clients are
thread-safe but not fork-safe).
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import boto3.exceptions
import boto3.s3.transfer  # imported eagerly so its loggers exist before redaction is installed
import botocore.exceptions
import s3transfer.exceptions
import urllib3.exceptions

from genimg.closing import Closing
from genimg.errors import (
    PayloadTooLargeError,
    StorageError,
    StorageNotFoundError,
    StorageUnavailableError,
    ValidationError,
)
from genimg.redaction import install_secret_redaction
from genimg.settings import StorageSettings
from genimg.stores.base import ObjectInfo, PutResult, sha256_hex
from genimg.stores.s3_client import (
    UNAVAILABLE_CODES,
    client_config,
    count_s3_attempts,
    delete_objects_content_md5,
    pool_size,
    resolve_credentials,
)
from genimg.urls import BUCKET_RE

logger = logging.getLogger(__name__)

SHA256_METADATA_KEY = "sha256"
"""User-metadata key (``x-amz-meta-sha256``) holding the hex sha256 of an object's bytes."""

DELETE_BATCH_SIZE = 1000
"""Keys per ``DeleteObjects`` request (S3's maximum)."""

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchUpload", "404"})

_BOTO_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    boto3.exceptions.Boto3Error,
    s3transfer.exceptions.RetriesExceededError,
    urllib3.exceptions.HTTPError,
)
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
    s3transfer.exceptions.RetriesExceededError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True)
class MultipartUpload:
    """An unfinished multipart upload.

    Attributes:
        key: object key.
        upload_id: S3's upload id.
        initiated: when it started (UTC, from the server).
    """

    key: str
    upload_id: str
    initiated: datetime



# --------------------------------------------------------------------------- error translation


def _find_cause(e: BaseException) -> BaseException:
    """The first botocore-level error in ``e``'s cause/context chain (``e`` itself if none)."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (botocore.exceptions.ClientError, *_TRANSIENT_ERRORS)):
            return current
        current = current.__cause__ or current.__context__
    return e


def translate_error(e: BaseException, what: str) -> StorageError:
    """Map a botocore/boto3/s3transfer error to genimg's storage error types.

    Args:
        e: the caught exception (the caller raises the result ``from e``).
        what: the operation and key, for the message (never secrets).

    Returns:
        :class:`StorageUnavailableError`, :class:`StorageNotFoundError` or
        :class:`StorageError`.
    """
    cause = _find_cause(e)
    if isinstance(cause, botocore.exceptions.ClientError):
        err = cause.response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        status = int(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = f"{what}: {code or status} {err.get('Message', '')}".strip()
        if code in _NOT_FOUND_CODES or status == 404:
            return StorageNotFoundError(message)
        if code in UNAVAILABLE_CODES or status >= 500 or status == 429:
            return StorageUnavailableError(message)
        return StorageError(message)
    if isinstance(cause, _TRANSIENT_ERRORS):
        return StorageUnavailableError(f"{what}: {type(cause).__name__}: {cause}")
    return StorageError(f"{what}: {type(cause).__name__}: {cause}")


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except _BOTO_ERRORS as e:
        raise translate_error(e, what) from e



class S3Store(Closing):
    """One bucket of an S3-compatible store, through a configured boto3 client.

    Keys are bucket-relative strings (``"prefix/job/shards/000001.tar"``).
    Every method raises only genimg's :class:`~genimg.errors.StorageError`
    family (plus :class:`~genimg.errors.ValidationError`/``PayloadTooLargeError``
    where noted).

    Args:
        settings: endpoint, region, addressing style, pool size, retries,
            timeouts, multipart threshold/chunk size and credentials.
        bucket: the bucket all keys refer to.
        callers: threads that may call this store at once (sizes the connection pool, :func:`pool_size`).

    Raises:
        ValidationError: invalid bucket name.
        ConfigError: inconsistent credentials settings.
    """

    def __init__(self, settings: StorageSettings, bucket: str, *, callers: int = 1) -> None:
        if not BUCKET_RE.match(bucket) or ".." in bucket:
            raise ValidationError(f"invalid bucket name {bucket!r}", field="bucket")
        self.bucket = bucket
        self.settings = settings
        creds = resolve_credentials(settings)
        session = boto3.session.Session(region_name=settings.s3_region, **creds)
        resolved = session.get_credentials()
        if resolved is not None:
            frozen = resolved.get_frozen_credentials()
            install_secret_redaction(frozen.access_key, frozen.secret_key, frozen.token)
        else:
            install_secret_redaction()
        verify: str | bool | None = str(settings.s3_ca_bundle) if settings.s3_ca_bundle else None
        pool, concurrency = pool_size(settings, callers)
        self._client = session.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            config=client_config(settings, pool),
            verify=verify,
        )
        self._client.meta.events.register("before-call.s3.DeleteObjects", delete_objects_content_md5)
        count_s3_attempts(self._client)
        self._transfer_config = boto3.s3.transfer.TransferConfig(
            multipart_threshold=settings.s3_multipart_threshold_bytes,
            multipart_chunksize=settings.s3_multipart_chunk_bytes,
            max_concurrency=concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )
        install_secret_redaction()  # loggers created while building the client
        logger.debug(
            "s3 store ready bucket=%s endpoint=%s addressing=%s retries=%s/%d",
            bucket,
            settings.s3_endpoint_url or "aws",
            settings.s3_addressing_style,
            settings.s3_retry_mode,
            settings.s3_max_attempts,
        )

    @property
    def client(self) -> Any:
        """The underlying boto3 S3 client (for tests and tooling; prefer the methods)."""
        return self._client

    def close(self) -> None:
        """Close the client's connection pool."""
        self._client.close()

    def url(self, key: str) -> str:
        """``s3://bucket/key`` for ``key``."""
        return f"s3://{self.bucket}/{key}"

    # ---- buckets

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (safe when several processes race).

        Raises:
            StorageUnavailableError: the store is unreachable or throttling.
            StorageError: the bucket exists but belongs to someone else, or
                creation was refused.
        """
        try:
            with _translated(f"head bucket {self.bucket}"):
                self._client.head_bucket(Bucket=self.bucket)
            return
        except StorageNotFoundError:
            pass
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.settings.s3_region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.s3_region}
        try:
            self._client.create_bucket(**kwargs)
            logger.info("created bucket %s", self.bucket)
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise translate_error(e, f"create bucket {self.bucket}") from e
        except _BOTO_ERRORS as e:
            raise translate_error(e, f"create bucket {self.bucket}") from e

    # ---- writing

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream", *,
                  metadata: Mapping[str, str] | None = None) -> PutResult:
        """Write ``data`` to ``key``, recording its sha256 as metadata ``sha256``.

        Below ``s3_multipart_threshold_bytes`` this is one ``PutObject`` with a
        ``Content-MD5`` header (the store verifies the body); at or above it,
        boto3's transfer manager uploads parts of ``s3_multipart_chunk_bytes``
        in parallel. Overwrites are atomic: readers see the old or the new
        object, never a mix.

        Args:
            key: object key.
            data: the object's bytes.
            content_type: HTTP ``Content-Type``.
            metadata: extra user metadata (ASCII keys and values).

        Returns:
            Key, size, sha256 and whether multipart was used.

        Raises:
            StorageUnavailableError: 5xx/throttling/connection errors after retries.
            StorageNotFoundError: the bucket does not exist.
            StorageError: any other refusal.
        """
        data = bytes(data)
        digest = sha256_hex(data)
        meta = {**(metadata or {}), SHA256_METADATA_KEY: digest}
        multipart = len(data) >= self.settings.s3_multipart_threshold_bytes
        with _translated(f"put {key}"):
            if not multipart:
                md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")
                self._client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    ContentType=content_type,
                    ContentMD5=md5,
                    Metadata=meta,
                )
            else:
                self._client.upload_fileobj(
                    io.BytesIO(data),
                    self.bucket,
                    key,
                    ExtraArgs={"ContentType": content_type, "Metadata": meta},
                    Config=self._transfer_config,
                )
        logger.debug("put key=%s bytes=%d sha256=%s multipart=%s", key, len(data), digest, multipart)
        return PutResult(key=key, size_bytes=len(data), sha256=digest, multipart=multipart)

    # ---- reading

    def get_bytes(self, key: str, *, max_bytes: int | None = None, verify_sha256: bool = False) -> bytes:
        """Read a whole object.

        Args:
            key: object key.
            max_bytes: refuse objects larger than this (checked before reading
                the body); ``None`` for no limit.
            verify_sha256: compare the bytes with metadata ``sha256`` (when present).

        Raises:
            StorageNotFoundError: no such key or bucket.
            PayloadTooLargeError: the object is larger than ``max_bytes``.
            StorageError: sha256 mismatch, or any other refusal.
            StorageUnavailableError: 5xx/throttling/connection errors after retries.
        """
        with _translated(f"get {key}"):
            resp = self._client.get_object(Bucket=self.bucket, Key=key)
            body = resp["Body"]
            try:
                size = int(resp.get("ContentLength", 0))
                if max_bytes is not None and size > max_bytes:
                    raise PayloadTooLargeError(f"{key} is {size} bytes, above max_bytes={max_bytes}")
                data = body.read()
            finally:
                body.close()
        if verify_sha256:
            expected = (resp.get("Metadata") or {}).get(SHA256_METADATA_KEY)
            if expected is not None and expected != sha256_hex(data):
                raise StorageError(f"get {key}: sha256 mismatch (metadata {expected})")
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Read ``length`` bytes of an object starting at byte ``start`` (one ranged GET).

        Raises:
            ValidationError: negative ``start`` or ``length``.
            StorageNotFoundError: no such key or bucket.
            StorageError: the store returned a different number of bytes
                (range beyond the end of the object), or any other refusal.
            StorageUnavailableError: 5xx/throttling/connection errors after retries.
        """
        if start < 0 or length < 0:
            raise ValidationError(f"bad range start={start} length={length}")
        if length == 0:
            return b""
        with _translated(f"get {key} [{start}, +{length})"):
            resp = self._client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            body = resp["Body"]
            try:
                data = body.read()
            finally:
                body.close()
        if len(data) != length:
            raise StorageError(f"get {key}: asked for {length} bytes at {start}, got {len(data)}")
        return data

    def head(self, key: str) -> ObjectInfo:
        """Size, sha256 metadata, content type and ETag of an object.

        Raises:
            StorageNotFoundError: no such key or bucket.
            StorageUnavailableError: 5xx/throttling/connection errors after retries.
            StorageError: any other refusal.
        """
        with _translated(f"head {key}"):
            resp = self._client.head_object(Bucket=self.bucket, Key=key)
        return ObjectInfo(
            key=key,
            size_bytes=int(resp.get("ContentLength", 0)),
            sha256=(resp.get("Metadata") or {}).get(SHA256_METADATA_KEY),
            content_type=str(resp.get("ContentType", "")),
            etag=str(resp.get("ETag", "")),
        )

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists (a HEAD request).

        Raises:
            StorageUnavailableError: 5xx/throttling/connection errors after retries.
            StorageError: any refusal other than "not found".
        """
        try:
            self.head(key)
        except StorageNotFoundError:
            return False
        return True

    def list_keys(self, prefix: str, *, page_size: int = 1000) -> list[str]:
        """Every key starting with ``prefix``, in S3's (lexicographic) order; paginated.

        Args:
            prefix: key prefix (``""`` for the whole bucket).
            page_size: keys per ``ListObjectsV2`` request (at most 1000).

        Raises:
            StorageNotFoundError: the bucket does not exist.
            StorageUnavailableError: 5xx/throttling/connection errors after retries.
            StorageError: any other refusal.
        """
        pages = self._pages("list_objects_v2", prefix, page_size=page_size)
        return [key for page in pages for key in self._page_keys(page)]

    @staticmethod
    def _page_keys(page: Mapping[str, Any]) -> Iterator[str]:
        for obj in page.get("Contents", []) or []:
            yield str(obj["Key"])

    def _pages(self, operation: str, prefix: str, *, page_size: int = 1000) -> Iterator[Mapping[str, Any]]:
        with _translated(f"{operation} {prefix!r}"):
            paginator = self._client.get_paginator(operation)
            yield from paginator.paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
            )

    # ---- deleting

    def delete_prefix(self, prefix: str, *, everything: bool = False) -> int:
        """Delete every object under ``prefix`` with batched ``DeleteObjects`` calls.

        Args:
            prefix: key prefix; must be non-empty unless ``everything``.
            everything: allow ``prefix=""`` (empties the bucket).

        Returns:
            The number of objects deleted.

        Raises:
            ValidationError: empty prefix without ``everything``.
            StorageUnavailableError: 5xx/throttling/connection errors after retries.
            StorageError: the store refused to delete some keys, or any other refusal.
        """
        if not prefix and not everything:
            raise ValidationError("refusing to delete a whole bucket without everything=True", field="prefix")
        deleted = 0
        batch: list[str] = []
        for page in self._pages("list_objects_v2", prefix):
            batch.extend(self._page_keys(page))
            while len(batch) >= DELETE_BATCH_SIZE:
                deleted += self._delete_batch(batch[:DELETE_BATCH_SIZE])
                batch = batch[DELETE_BATCH_SIZE:]
        if batch:
            deleted += self._delete_batch(batch)
        logger.debug("deleted prefix=%s objects=%d", prefix, deleted)
        return deleted

    def _delete_batch(self, keys: list[str]) -> int:
        with _translated(f"delete {len(keys)} keys from {keys[0]!r}"):
            resp = self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
            )
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageError(
                f"delete refused for {len(errors)} of {len(keys)} keys, "
                f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}"
            )
        return len(keys)

    # ---- multipart hygiene

    def list_multipart_uploads(self, prefix: str = "") -> list[MultipartUpload]:
        """Unfinished multipart uploads under ``prefix`` (left by killed writers).

        Raises:
            StorageUnavailableError: 5xx/throttling/connection errors after retries.
            StorageError: any other refusal.
        """
        uploads = []
        for page in self._pages("list_multipart_uploads", prefix):
            for up in page.get("Uploads", []) or []:
                uploads.append(
                    MultipartUpload(key=str(up["Key"]), upload_id=str(up["UploadId"]), initiated=up["Initiated"])
                )
        return uploads

    def abort_multipart_uploads(self, prefix: str = "", *, older_than_s: float | None = None) -> int:
        """Abort unfinished multipart uploads under ``prefix`` so their parts stop costing storage.

        Args:
            prefix: key prefix.
            older_than_s: only those initiated more than this many seconds ago
                (by the server's clock, relative to this machine's); ``None`` for all.
                Use it to spare uploads that live writers are still sending.

        Returns:
            The number of uploads aborted (an upload already gone counts as aborted).

        Raises:
            StorageUnavailableError: 5xx/throttling/connection errors after retries.
            StorageError: any other refusal.
        """
        cutoff = None
        if older_than_s is not None:
            cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        aborted = 0
        for up in self.list_multipart_uploads(prefix):
            initiated = up.initiated if up.initiated.tzinfo else up.initiated.replace(tzinfo=UTC)
            if cutoff is not None and initiated > cutoff:
                continue
            try:
                with _translated(f"abort multipart {up.key}"):
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=up.key, UploadId=up.upload_id)
            except StorageNotFoundError:
                pass
            aborted += 1
        if aborted:
            logger.info("aborted multipart uploads prefix=%s count=%d", prefix, aborted)
        return aborted
