"""Object stores: the one package for where a job's bytes go.

=================================  ==========================================================
module                             what it holds
=================================  ==========================================================
:mod:`genimg.stores.base`          the seam: :class:`ObjectStore` / :class:`ManagedStore`
                                   protocols, ``PutResult``, ``ObjectInfo``, ``sha256_hex``
:mod:`genimg.stores.s3`            :class:`~genimg.stores.s3.S3Store` (any S3 API) and the
                                   translation of botocore's errors
:mod:`genimg.stores.s3_client`     the boto3 client's configuration, credentials, pool size,
                                   throttle and retry counters
:mod:`genimg.stores.files`         :class:`~genimg.stores.files.FileStore`, ``file://`` outputs
=================================  ==========================================================

Every stage (producer, worker, manifest) opens a store through this module
instead of choosing a store class itself; a job's store comes with its
:class:`~genimg.layout.Layout`::

    store, layout = open_job_store(spec.output, spec.job_id)
    store.put_bytes(f"{layout.job_prefix}/job.json", ...)

For ``s3://bucket/prefix`` the store is an :class:`~genimg.stores.s3.S3Store` on
``bucket`` and the key prefix is ``prefix``. For ``file:///dir`` the store is a
:class:`~genimg.stores.files.FileStore` rooted at ``/dir`` and the key prefix is
empty, so a job's files land in ``/dir/{job_id}/`` exactly as they would under
``s3://bucket/prefix/{job_id}/``.

The URL is expected to be a validated ``JobSpec.output``
(:func:`genimg.urls.validate_output_url` decides which local roots are allowed).
"""

from __future__ import annotations

from genimg.errors import ValidationError
from genimg.layout import Layout
from genimg.settings import StorageSettings
from genimg.stores.base import ManagedStore, ObjectStore
from genimg.urls import parse_s3_url

__all__ = ["ManagedStore", "ObjectStore", "open_job_store", "open_store"]


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
        from genimg.stores.files import FileStore

        return FileStore(output_url[len("file://"):]), ""
    if isinstance(output_url, str) and output_url.startswith("s3://"):
        from genimg.stores.s3 import S3Store

        bucket, prefix = parse_s3_url(output_url)
        return S3Store(settings or StorageSettings.from_env(), bucket, callers=callers), prefix
    raise ValidationError(f"expected s3://bucket/prefix or file:///dir, got {output_url!r}", field="output")


def open_job_store(output_url: str, job_id: str, settings: StorageSettings | None = None, *, callers: int = 1,
                   cache: dict[str, tuple[ManagedStore, str]] | None = None) -> tuple[ManagedStore, Layout]:
    """:func:`open_store` plus the job's :class:`~genimg.layout.Layout` in that store: the one way to get both.

    Args:
        output_url: the job's ``output``.
        job_id: the job.
        settings: S3 settings (read from ``GENIMG_*`` when omitted).
        callers: threads that will call the store at once.
        cache: ``{root: (store, prefix)}`` of stores already opened, ``root`` being ``s3://bucket``
            or the ``file://`` URL: a store found there is reused for every output URL in the same
            bucket (building a boto3 client costs about 0.2 s of CPU, and each job has its own
            URL), a new one is added (the caller closes them; the producer and each worker
            process keep one such cache).

    Raises:
        ValidationError: a bad URL or job id.
        ConfigError: inconsistent S3 credentials settings.
    """
    if cache is None:
        store, prefix = open_store(output_url, settings, callers=callers)
    else:
        root, prefix = output_url, ""
        if isinstance(output_url, str) and output_url.startswith("s3://"):
            bucket, prefix = parse_s3_url(output_url)
            root = f"s3://{bucket}"
        if root not in cache:  # kept with prefix "": the store serves every prefix of its bucket
            cache[root] = (open_store(output_url, settings, callers=callers)[0], "")
        store = cache[root][0]
    return store, Layout(bucket=store.bucket, prefix=prefix, job_id=job_id)
