"""Open the object store behind a job's output URL: S3 (``s3://``) or a local directory (``file://``).

Every stage (producer, worker, manifest) calls :func:`open_store` or
:func:`open_job_store` instead of choosing a store class itself::

    store, layout = open_job_store(spec.output, spec.job_id)
    store.put_bytes(f"{layout.job_prefix}/job.json", ...)

For ``s3://bucket/prefix`` the store is an :class:`~genimg.storage.S3Store` on
``bucket`` and the key prefix is ``prefix``. For ``file:///dir`` the store is a
:class:`~genimg.localstore.FileStore` rooted at ``/dir`` and the key prefix is
empty, so a job's files land in ``/dir/{job_id}/`` exactly as they would under
``s3://bucket/prefix/{job_id}/``.

The URL is expected to be a validated ``JobSpec.output``
(:func:`genimg.spec.validate_output_url` decides which local roots are allowed).
"""

from __future__ import annotations

from typing import Protocol

from genimg.errors import ValidationError
from genimg.layout import Layout
from genimg.localstore import FileStore
from genimg.settings import StorageSettings
from genimg.storage import ObjectStore, S3Store
from genimg.urls import parse_s3_url


class ManagedStore(ObjectStore, Protocol):
    """An :class:`~genimg.storage.ObjectStore` that can also delete a prefix and be closed."""

    def delete_prefix(self, prefix: str, *, everything: bool = ...) -> int: ...

    def close(self) -> None: ...


def open_store(output_url: str, settings: StorageSettings | None = None, *,
               callers: int = 1) -> tuple[ManagedStore, str]:
    """The store for ``output_url`` and the key prefix inside it.

    Args:
        output_url: ``s3://bucket[/prefix]`` or ``file:///absolute/dir``.
        settings: S3 settings (read from ``GENIMG_*`` when omitted; unused for ``file://``).
        callers: threads that will call the store at once (sizes an S3 connection pool).

    Returns:
        ``(store, prefix)``; ``prefix`` has no leading or trailing ``/``.

    Raises:
        ValidationError: ``field="output"`` for any other URL form.
        ConfigError: inconsistent S3 credentials settings.
    """
    if isinstance(output_url, str) and output_url.startswith("file:///"):
        return FileStore(output_url[len("file://"):]), ""
    if isinstance(output_url, str) and output_url.startswith("s3://"):
        bucket, prefix = parse_s3_url(output_url)
        return S3Store(settings or StorageSettings.from_env(), bucket, callers=callers), prefix
    raise ValidationError(f"expected s3://bucket/prefix or file:///dir, got {output_url!r}", field="output")


def open_job_store(output_url: str, job_id: str,
                   settings: StorageSettings | None = None) -> tuple[ManagedStore, Layout]:
    """:func:`open_store` plus the job's :class:`~genimg.shards.Layout` in that store.

    Raises:
        ValidationError: a bad URL or job id.
    """
    store, prefix = open_store(output_url, settings)
    return store, Layout(bucket=store.bucket, prefix=prefix, job_id=job_id)
