"""Typed settings read from ``GENIMG_*`` environment variables: one family, each shared field declared once.

Every class derives from :class:`GenimgSettings` (prefix ``GENIMG_``, frozen);
:class:`RedisSettings` declares the broker URL and queue that the workers
(:class:`WorkerSettings`), the producer, the reconciler and the exporter share.
Every quantity carries its unit in its name (``timeout_s``, ``max_bytes``).
Build them with ``X.from_env()``, ``X.checked()`` or keyword arguments.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
import pydantic
from pydantic import AfterValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from genimg.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent

WEIGHTS_DIR = _PACKAGE_DIR / "models" / "weights"
"""Directory of the committed, trained PyTorch state dicts."""


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""Values of ``GENIMG_LOG_LEVEL`` (case-insensitive)."""

RETIRED_VARIABLES = {
    "GENIMG_MAX_RETRIES": "no longer read: a shard's retries are bounded in time by GENIMG_RETRY_BUDGET_S "
                          "(seconds, default 600); unset GENIMG_MAX_RETRIES",
}
"""Variables genimg no longer reads; set, they would silently change nothing, so start-up refuses them."""

_HOST_PORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?):(\d{1,5})$")


def _check_host_port(value: str) -> str:
    m = _HOST_PORT_RE.match(value)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ValueError("expected host:port")
    return value


def _check_http_url(value: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as e:
        raise ValueError("expected an http:// or https:// URL") from e
    if parts.scheme not in ("http", "https") or not parts.hostname or (port is not None and port == 0):
        raise ValueError("expected an http:// or https:// URL")
    return value


def _check_redis_url(value: SecretStr) -> SecretStr:
    from urllib.parse import urlsplit

    raw = value.get_secret_value()
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ValueError("expected a redis://, rediss:// or unix:// URL") from e
    if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return value


HostPort = Annotated[str, AfterValidator(_check_host_port)]
"""``host:port`` (a name, an IPv4 address or a bracketed IPv6 address; port 1-65535)."""
HttpUrl = Annotated[str, AfterValidator(_check_http_url)]
"""An ``http://`` or ``https://`` URL with a host."""
RedisUrl = Annotated[SecretStr, AfterValidator(_check_redis_url)]
"""A ``redis://``, ``rediss://`` or ``unix://`` URL (its password is never shown)."""

_ALLOWED_TEXT = {
    HostPort: "host:port, e.g. triton:8001",
    HttpUrl: "an http:// or https:// URL, e.g. http://minio:9000",
    RedisUrl: "a redis://, rediss:// or unix:// URL, e.g. redis://redis:6379/0",
}


def _annotation_text(annotation: Any) -> str | None:
    """Allowed values of a type: a Literal's values, bool, or one of genimg's URL types."""
    for known, text in _ALLOWED_TEXT.items():
        if annotation == known:
            return text
    if get_origin(annotation) is Literal:
        return ", ".join(str(a) for a in get_args(annotation))
    args = [a for a in get_args(annotation) if a is not type(None)]
    if args and get_origin(annotation) is not Annotated:
        for a in args:
            found = _annotation_text(a)
            if found:
                return found
    if annotation is bool:
        return "true or false"
    return None


def describe_allowed(model: type[BaseSettings], name: str) -> str:
    """Words for the values field ``name`` of ``model`` accepts, e.g. ``"grpc, http"`` or ``"an integer >= 1"``."""
    info = model.model_fields[name]
    text = _annotation_text(info.annotation)
    if text is None:
        for meta in info.metadata:  # a field declared with an Annotated genimg type keeps its validator here
            for known, known_text in _ALLOWED_TEXT.items():
                if any(m is meta for m in getattr(known, "__metadata__", ())):
                    text = known_text
    if text:
        return text
    args = [a for a in get_args(info.annotation) if a is not type(None)] or [info.annotation]
    kind = {int: "an integer", float: "a number", Path: "a path", str: "text"}.get(args[0], "a value")
    bounds = []
    for meta in info.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("pattern", "matching")):
            v = getattr(meta, attr, None)
            if v is not None:
                bounds.append(f"{op} {v}")
        if isinstance(meta, annotated_types.MaxLen):
            bounds.append(f"of at most {meta.max_length} characters")
    return " ".join([kind, " and ".join(bounds)]).strip()


def _shown(model: type[BaseSettings], name: str, value: object) -> str:
    """The offending value for a message: never a secret (URLs are shown with the password masked)."""
    if value is None:
        return "<unset>"
    text = str(value)
    if "SecretStr" in repr(model.model_fields[name].annotation) or "SecretStr" in str(
            model.model_fields[name].metadata):
        if "://" not in text:
            return "'***'"
        from genimg.redaction import redact_url

        text = redact_url(text)
    return repr(text if len(text) <= 120 else text[:117] + "...")


def settings_error(model: type[BaseSettings], error: pydantic.ValidationError,
                   overrides: dict[str, Any] | None = None) -> ConfigError:
    """One line for the first invalid field: the variable, the value given and the allowed values."""
    first = error.errors(include_url=False)[0]
    name = str(first["loc"][0]) if first.get("loc") else ""
    if name not in model.model_fields:
        return ConfigError(f"invalid settings: {first.get('msg')}")
    var = f"GENIMG_{name.upper()}"
    given = (overrides or {}).get(name, os.environ.get(var))
    return ConfigError(f"invalid {var}={_shown(model, name, given)}: allowed {describe_allowed(model, name)}")


def load_settings(model: type[BaseSettings], **overrides: Any):  # noqa: ANN201 - returns a model instance
    """``model(**overrides)`` with the environment, or :class:`ConfigError` naming the first invalid variable.

    Raises:
        ConfigError: one line, ``invalid GENIMG_X='value': allowed …``.
    """
    try:
        return model(**overrides)
    except pydantic.ValidationError as e:
        raise settings_error(model, e, overrides) from None


def check_retired_variables(environ: dict[str, str] | None = None) -> None:
    """Refuse variables genimg no longer reads (:data:`RETIRED_VARIABLES`).

    Raises:
        ConfigError: naming the variable and what replaced it.
    """
    env = os.environ if environ is None else environ
    for var, why in RETIRED_VARIABLES.items():
        if var in env:
            raise ConfigError(f"invalid {var}={env[var]!r}: {why}")


def check_log_level(value: str | None) -> str:
    """``value`` upper-cased if it is one of :data:`LOG_LEVELS`.

    Raises:
        ConfigError: naming ``GENIMG_LOG_LEVEL`` and the allowed values.
    """
    level = (value or "INFO").upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"invalid GENIMG_LOG_LEVEL={value!r}: allowed {', '.join(LOG_LEVELS)}")
    return level


class GenimgSettings(BaseSettings):
    """The root of genimg's settings: ``GENIMG_*`` variables, frozen, unknown variables ignored."""

    model_config = SettingsConfigDict(env_prefix="GENIMG_", frozen=True, extra="ignore")

    @classmethod
    def from_env(cls, **overrides: object):  # noqa: ANN206 - pydantic returns Self
        """Read the environment, then apply keyword overrides."""
        return cls(**overrides)

    @classmethod
    def checked(cls, **overrides: object):  # noqa: ANN206 - pydantic returns Self
        """:meth:`from_env`, raising :class:`ConfigError` that names the first invalid ``GENIMG_*`` variable."""
        return load_settings(cls, **overrides)


class RedisSettings(GenimgSettings):
    """The broker: what every component that talks to the queue reads."""

    redis_url: RedisUrl = SecretStr("redis://127.0.0.1:6379/0")
    """Broker (and genimg's job state); ``rediss://`` for TLS; a password in the URL is never logged."""
    queue: str = Field(default="genimg", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """The Celery queue the shards go to (the workers' ``GENIMG_QUEUE``)."""


class WorkerSettings(RedisSettings):
    """Settings of a Celery worker process (all from ``GENIMG_*`` variables); the producer and the reconciler
    read the same ones (broker, queue, key prefix, timing) so that they agree with the workers.

    Case C1: Redis redelivers an unacknowledged task after the visibility
    timeout, so a shard that runs (or waits on a retry countdown) longer than it
    would run twice; :func:`check_timing` refuses such settings.
    """

    key_prefix: str = Field(default="genimg", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    visibility_timeout_s: int = Field(default=300, gt=0)
    task_hard_time_limit_s: int = Field(default=240, gt=0)
    task_soft_time_limit_s: int = Field(default=210, gt=0)
    retry_backoff_base_s: float = Field(default=2.0, gt=0)
    retry_backoff_max_s: int = Field(default=60, gt=0)
    """Largest retry countdown; must stay below the visibility timeout."""
    retry_budget_s: float = Field(default=600.0, ge=0)
    """How long a shard keeps retrying retryable faults, from its first one, before it is failed
    (``retries_exhausted``). Time, not a count: it must outlast a Triton restart that reloads models."""
    triton_check_interval_s: float = Field(default=2.0, gt=0, le=60)
    """How often the worker's main process asks Triton whether the models it needs are ready; it takes
    shards only while they are (:mod:`workers.gate`)."""
    unacked_restore_interval_s: int = Field(default=5, gt=0)
    """How often kombu sweeps for messages past their visibility timeout."""
    concurrency: int = Field(default=1, gt=0, le=256)
    """Pool processes (prefork); each holds its own Triton and S3 clients."""
    max_tasks_per_child: int = Field(default=0, ge=0)
    """Recycle a pool child after this many shards (0 = never)."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port of the worker's /metrics endpoint (0 = no endpoint)."""
    metrics_dir: str = ""
    """prometheus_client multiprocess directory (PROMETHEUS_MULTIPROC_DIR); wiped at start."""
    upload_threads: int = Field(default=4, gt=0, le=64)
    infer_inflight: int = Field(default=2, gt=0, le=64)
    """Triton requests (of ``sub_batch_size`` items each) one pool process keeps in flight."""
    check_timing: bool = True
    """Refuse to start on unsafe timing (C1). Only tests switch this off."""


def check_timing(s: WorkerSettings) -> None:
    """Raise ConfigError unless soft < hard < visibility timeout, max countdown < visibility timeout and
    first countdown <= max countdown.

    Raises:
        ConfigError: naming the two settings that conflict.
    """
    if not s.task_soft_time_limit_s < s.task_hard_time_limit_s:
        raise ConfigError(
            f"GENIMG_TASK_SOFT_TIME_LIMIT_S ({s.task_soft_time_limit_s}) must be below "
            f"GENIMG_TASK_HARD_TIME_LIMIT_S ({s.task_hard_time_limit_s})")
    if not s.task_hard_time_limit_s < s.visibility_timeout_s:
        raise ConfigError(
            f"GENIMG_VISIBILITY_TIMEOUT_S ({s.visibility_timeout_s}) must exceed "
            f"GENIMG_TASK_HARD_TIME_LIMIT_S ({s.task_hard_time_limit_s}): Redis would redeliver a "
            "shard that is still running (case C1)")
    if not s.retry_backoff_max_s < s.visibility_timeout_s:
        raise ConfigError(
            f"GENIMG_VISIBILITY_TIMEOUT_S ({s.visibility_timeout_s}) must exceed "
            f"GENIMG_RETRY_BACKOFF_MAX_S ({s.retry_backoff_max_s}): a shard waiting on its retry "
            "countdown would be redelivered (case C1)")
    if not s.retry_backoff_base_s <= s.retry_backoff_max_s:
        raise ConfigError(
            f"GENIMG_RETRY_BACKOFF_BASE_S ({s.retry_backoff_base_s:g}) must not exceed "
            f"GENIMG_RETRY_BACKOFF_MAX_S ({s.retry_backoff_max_s}): every countdown would be the maximum")


def stranded_after_s(s: WorkerSettings) -> float:
    """Seconds a shard must be missing from every queue structure before the reconciler re-enqueues it.

    ``visibility_timeout_s + retry_backoff_max_s``: a run of a shard whose
    message Redis no longer holds ends within the hard time limit (< the
    visibility timeout, :func:`check_timing`) after a retry countdown of at
    most ``retry_backoff_max_s``; so once a shard has been missing that long,
    no worker can still be running it (docs/operations.md, "The reconciler").
    """
    return float(s.visibility_timeout_s + s.retry_backoff_max_s)


class ModelSettings(GenimgSettings):
    """Where model artefacts live on the building machine."""

    cache_dir: Path = Field(default=Path(".cache/genimg"), description="ONNX exports and caches")
    weights_dir: Path = WEIGHTS_DIR


class TritonSettings(GenimgSettings):
    """How the worker reaches Triton."""

    triton_url: HostPort = "127.0.0.1:8001"
    triton_protocol: Literal["grpc", "http"] = "grpc"
    triton_timeout_s: float = Field(default=60.0, gt=0)
    triton_ready_timeout_s: float = Field(default=120.0, gt=0)
    triton_max_message_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    """gRPC send/receive limit; at least 1 MiB (below it even the repository index does not fit)."""
    triton_expander: str = Field(default="prompt_expander", pattern=r"^([A-Za-z_][A-Za-z0-9_.-]{0,127})?$")
    """The prompt expander (jobs with ``expand``) a worker waits for besides the profiles' models; empty:
    none (a repository built with ``--no-expander`` or ``--profiles-only``)."""


class StorageSettings(GenimgSettings):
    """S3-compatible storage (AWS S3, MinIO, Ceph, moto, ...).

    Credentials, first match wins: ``GENIMG_S3_ACCESS_KEY_ID`` and
    ``GENIMG_S3_SECRET_ACCESS_KEY`` (optionally ``GENIMG_S3_SESSION_TOKEN``);
    else the mounted INI file ``GENIMG_S3_CREDENTIALS_FILE`` (AWS
    shared-credentials format, section ``GENIMG_S3_CREDENTIALS_PROFILE``); else
    boto3's standard chain (``AWS_*`` variables, web identity, instance role).
    ``s3_max_attempts`` counts every attempt, the first included.
    """

    s3_endpoint_url: HttpUrl | None = None
    s3_region: str = Field(default="us-east-1", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    s3_addressing_style: Literal["path", "virtual", "auto"] = "path"
    s3_max_pool_connections: int | None = Field(default=None, gt=0)
    """Connections per S3 client; unset: sized from the callers' threads × ``s3_transfer_max_concurrency``."""
    s3_max_attempts: int = Field(default=5, gt=0)
    s3_multipart_threshold_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_session_token: SecretStr | None = None
    s3_credentials_file: Path | None = Field(default=None, description="mounted AWS-style INI file")
    s3_credentials_profile: str = "default"
    s3_retry_mode: Literal["standard", "adaptive"] = "standard"
    s3_connect_timeout_s: float = Field(default=10.0, gt=0)
    s3_read_timeout_s: float = Field(default=60.0, gt=0)
    s3_multipart_chunk_bytes: int = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024)
    s3_transfer_max_concurrency: int = Field(default=4, gt=0)
    s3_ca_bundle: Path | None = Field(default=None, description="PEM bundle for a private CA")


class SpecSettings(GenimgSettings):
    """What job-spec validation reads from the environment (``genimg.spec``).

    The numeric limits of a job are constants in ``genimg.spec`` (producer and
    worker must agree on them); only deployment-specific paths live here.
    """

    local_output_root: Path | None = Field(
        default=None,
        description="file:// outputs must resolve (symlinks followed) inside this directory "
        "[env GENIMG_LOCAL_OUTPUT_ROOT]; unset disables file:// outputs",
    )


def check_spec_settings(settings: SpecSettings) -> None:
    """Start-up check of ``GENIMG_LOCAL_OUTPUT_ROOT``: unset, or an existing directory.

    Raises:
        ConfigError: naming the variable.
    """
    root = settings.local_output_root
    if root is not None and not root.is_dir():
        raise ConfigError(f"invalid GENIMG_LOCAL_OUTPUT_ROOT={str(root)!r}: allowed an existing directory "
                          "(or unset)")
