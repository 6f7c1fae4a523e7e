"""Where a job's objects live: :class:`Layout`, keys computed from (bucket, prefix, job id), and the job id rule.

Output layout under ``s3://{bucket}/{prefix}/{job_id}/`` (``file:///dir/{job_id}/`` for a local store)::

    job.json                   the job's spec (:data:`SPEC_OBJECT`)
    prompts/000000000.json     prompt chunks (:func:`genimg.inputs.prompt_chunk_key`)
    inputs/wildcards.json      wildcard options of an expanded job (:data:`genimg.expand.WILDCARDS_OBJECT`)
    shards/000042.tar          WebDataset tar (:mod:`genimg.shards`)
    shards/000042.stats.json   items ok/failed, seconds per stage, sizes
    shards/000042.parquet      the shard index, written last: the commit marker
    manifest/part-00000.parquet, manifest/_part-00000.json   manifest parts and their summaries
    _SUCCESS                   the job's summary once finalised (:data:`SUCCESS_OBJECT`)

Stores and layouts are opened together by :func:`genimg.stores.open_job_store`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from genimg.errors import ValidationError
from genimg.urls import parse_s3_url

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
"""A job id: 32 lowercase hex digits (:func:`genimg.spec.derive_job_id`)."""
JOB_ID_RE = re.compile(JOB_ID_PATTERN)

SPEC_OBJECT = "job.json"
"""The job's spec, relative to its prefix."""
SUCCESS_OBJECT = "_SUCCESS"
"""The job's summary once it is finalised, relative to its prefix."""

SHARD_DIGITS = 6
"""Digits of a shard file name: shard indices are below 10**6."""
MAX_SHARD_INDEX = 10**SHARD_DIGITS - 1

_INDEX_NAME_RE = re.compile(rf"^(\d{{{SHARD_DIGITS}}})\.parquet$")


def check_job_id(job_id: object) -> str:
    """``job_id`` if it is 32 lowercase hex digits.

    Raises:
        ValidationError: ``field="job_id"``.
    """
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise ValidationError(f"must be 32 lowercase hex digits (got {repr(job_id)[:40]})", field="job_id")
    return job_id


@dataclass(frozen=True)
class Layout:
    """Where a job's files live: keys computed from (bucket, prefix, job id).

    Attributes:
        bucket: S3 bucket.
        prefix: key prefix without leading/trailing slashes (may be empty).
        job_id: 32 lowercase hex digits (:data:`JOB_ID_PATTERN`).

    Raises:
        ValidationError: a bad job id or prefix.
    """

    bucket: str
    prefix: str
    job_id: str

    def __post_init__(self) -> None:
        check_job_id(self.job_id)
        parse_s3_url(f"s3://{self.bucket}/{self.prefix}")  # validates bucket and prefix
        if self.prefix != self.prefix.strip("/"):
            raise ValidationError(f"prefix must not start or end with '/': {self.prefix!r}", field="prefix")

    @classmethod
    def from_url(cls, url: str, job_id: str) -> Layout:
        """``Layout.from_url("s3://bucket/datasets", job_id)``.

        Raises:
            ValidationError: a bad URL or job id.
        """
        bucket, prefix = parse_s3_url(url)
        return cls(bucket=bucket, prefix=prefix, job_id=job_id)

    @property
    def job_prefix(self) -> str:
        """``{prefix}/{job_id}`` (just ``{job_id}`` with an empty prefix)."""
        return f"{self.prefix}/{self.job_id}" if self.prefix else self.job_id

    @property
    def shards_prefix(self) -> str:
        """``{job_prefix}/shards/`` (with the trailing slash)."""
        return f"{self.job_prefix}/shards/"

    def _shard_base(self, shard_index: int) -> str:
        if not 0 <= shard_index <= MAX_SHARD_INDEX:
            raise ValidationError(f"shard index must be in 0..{MAX_SHARD_INDEX}, got {shard_index}")
        return f"{self.shards_prefix}{shard_index:0{SHARD_DIGITS}d}"

    def tar_key(self, shard_index: int) -> str:
        """``{job_prefix}/shards/{shard:06d}.tar``."""
        return f"{self._shard_base(shard_index)}.tar"

    def index_key(self, shard_index: int) -> str:
        """``{job_prefix}/shards/{shard:06d}.parquet`` — the commit marker."""
        return f"{self._shard_base(shard_index)}.parquet"

    def stats_key(self, shard_index: int) -> str:
        """``{job_prefix}/shards/{shard:06d}.stats.json``."""
        return f"{self._shard_base(shard_index)}.stats.json"

    @property
    def manifest_prefix(self) -> str:
        """``{job_prefix}/manifest/`` (with the trailing slash): the manifest's parts (:mod:`genimg.manifest`)."""
        return f"{self.job_prefix}/manifest/"

    def manifest_part_key(self, part: int) -> str:
        """``{job_prefix}/manifest/part-{part:05d}.parquet``."""
        if not 0 <= part < 10**5:
            raise ValidationError(f"manifest part must be in 0..99999, got {part}")
        return f"{self.manifest_prefix}part-{part:05d}.parquet"

    def manifest_summary_key(self, part: int) -> str:
        """``{job_prefix}/manifest/_part-{part:05d}.json`` — the part's summary, written after it."""
        if not 0 <= part < 10**5:
            raise ValidationError(f"manifest part must be in 0..99999, got {part}")
        return f"{self.manifest_prefix}_part-{part:05d}.json"

    def shard_of_index_key(self, key: str) -> int | None:
        """The shard index if ``key`` is one of this job's shard index keys, else ``None``."""
        if not key.startswith(self.shards_prefix):
            return None
        match = _INDEX_NAME_RE.match(key[len(self.shards_prefix) :])
        return int(match.group(1)) if match else None

    def url(self, key: str) -> str:
        """``s3://{bucket}/{key}``."""
        return f"s3://{self.bucket}/{key}"
