"""The boto3 S3 client genimg configures for any S3 API: credentials, botocore config, pool size, counters.

Client configuration (case C6, "any S3 API"): checksums are computed and
validated only ``when_required`` (recent botocore otherwise sends CRC
``x-amz-checksum-*`` headers and ``aws-chunked`` bodies some stores reject);
``DeleteObjects`` — which S3 requires a checksum for — carries the classic
``Content-MD5`` header instead of a CRC32 one, the form every S3 API accepts;
path-style addressing by default; botocore's ``standard`` or ``adaptive``
retry mode; a connection pool sized for the store's callers (:func:`pool_size`:
threads that call it at once × parts uploaded at once per call, plus spares),
so urllib3 never discards connections with "Connection pool is full".

Throttles and retries are counted (:func:`count_s3_attempts`, botocore event
hooks on every attempt): ``genimg_s3_throttled_total{operation,code}`` for each
response that throttled (503, 429 or a throttling code such as ``SlowDown``),
``genimg_s3_retries_total{operation,code}`` for each failed attempt botocore
retried. Both count inside botocore's own retries, which genimg's errors never see.

Secrets (case C7): credentials come from settings, a mounted file or boto3's
standard chain (:func:`resolve_credentials`), and are never logged (the store
registers them with :mod:`genimg.redaction`).
"""

from __future__ import annotations

import base64
import configparser
import hashlib
from typing import Any

from botocore.config import Config

from genimg.errors import ConfigError
from genimg.settings import StorageSettings

THROTTLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException",
    }
)
"""Error codes of a response that throttled."""
UNAVAILABLE_CODES = (THROTTLE_CODES - {"ProvisionedThroughputExceededException"}) | {
    "RequestTimeout",
    "RequestTimeoutException",
    "ServiceUnavailable",
    "InternalError",
    "PriorRequestNotComplete",
    "OperationAborted",
}
"""Error codes of a fault worth retrying later (:class:`~genimg.errors.StorageUnavailableError`)."""
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})

SPARE_CONNECTIONS = 2
"""Connections beyond ``callers × s3_transfer_max_concurrency`` (a HEAD or GET beside the uploads)."""


def delete_objects_content_md5(params: dict[str, Any], **_: Any) -> None:
    """``before-call.s3.DeleteObjects``: send Content-MD5 instead of a CRC32 checksum.

    S3 requires an integrity header on DeleteObjects. botocore ≥ 1.36 sends
    ``x-amz-checksum-crc32`` even with ``when_required``, which S3-compatible
    stores that predate flexible checksums answer with ``MissingContentMD5``.
    Content-MD5 is accepted by AWS S3 and every S3 API.
    """
    body = params.get("body") or b""
    if isinstance(body, str):
        body = body.encode("utf-8")
    if isinstance(body, (bytes, bytearray)):
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        params["headers"]["Content-MD5"] = base64.b64encode(digest).decode("ascii")
        checksum = params.get("context", {}).get("checksum", {})
        checksum.pop("request_algorithm", None)
        checksum.pop("request_algorithm_header", None)


def _read_credentials_file(settings: StorageSettings) -> dict[str, str]:
    path = settings.s3_credentials_file
    assert path is not None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"cannot read S3 credentials file {path}: {e.strerror}") from e
    except configparser.Error as e:
        raise ConfigError(f"S3 credentials file {path} is not an INI file") from e
    profile = settings.s3_credentials_profile
    if not parser.has_section(profile):
        raise ConfigError(f"S3 credentials file {path} has no [{profile}] section")
    section = parser[profile]
    key_id = section.get("aws_access_key_id", "").strip()
    secret = section.get("aws_secret_access_key", "").strip()
    if not key_id or not secret:
        raise ConfigError(
            f"S3 credentials file {path} [{profile}] needs aws_access_key_id and aws_secret_access_key"
        )
    creds = {"aws_access_key_id": key_id, "aws_secret_access_key": secret}
    token = section.get("aws_session_token", "").strip()
    if token:
        creds["aws_session_token"] = token
    return creds


def resolve_credentials(settings: StorageSettings) -> dict[str, str]:
    """Explicit credentials for boto3, or ``{}`` to use boto3's standard chain.

    Order: ``GENIMG_S3_ACCESS_KEY_ID``/``GENIMG_S3_SECRET_ACCESS_KEY``
    (+ ``GENIMG_S3_SESSION_TOKEN``), then ``GENIMG_S3_CREDENTIALS_FILE``, then
    ``{}`` (``AWS_*`` variables, web identity, instance role, ...).

    Raises:
        ConfigError: only one of key id / secret is set, or the credentials
            file is unreadable or incomplete.
    """
    key_id = settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else ""
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else ""
    if key_id or secret:
        if not (key_id and secret):
            raise ConfigError("set both GENIMG_S3_ACCESS_KEY_ID and GENIMG_S3_SECRET_ACCESS_KEY, or neither")
        creds = {"aws_access_key_id": key_id, "aws_secret_access_key": secret}
        if settings.s3_session_token:
            creds["aws_session_token"] = settings.s3_session_token.get_secret_value()
        return creds
    if settings.s3_credentials_file is not None:
        return _read_credentials_file(settings)
    return {}


def check_storage(settings: StorageSettings) -> None:
    """Start-up checks of S3 settings beyond their types: files that must exist, credentials that must pair.

    Raises:
        ConfigError: naming the variable.
    """
    bundle = settings.s3_ca_bundle
    if bundle is not None and not bundle.is_file():
        raise ConfigError(f"invalid GENIMG_S3_CA_BUNDLE={str(bundle)!r}: allowed an existing PEM file")
    creds = settings.s3_credentials_file
    if creds is not None and not creds.is_file():
        raise ConfigError(f"invalid GENIMG_S3_CREDENTIALS_FILE={str(creds)!r}: allowed an existing "
                          "AWS-style INI file")
    resolve_credentials(settings)  # pairs of key id and secret, a readable profile


def pool_size(settings: StorageSettings, callers: int = 1) -> tuple[int, int]:
    """``(max_pool_connections, transfer_concurrency)`` for a store that ``callers`` threads use at once.

    Each caller may run one upload with ``s3_transfer_max_concurrency`` part
    uploads in flight, so the pool holds ``callers × concurrency +``
    :data:`SPARE_CONNECTIONS`. An explicit ``GENIMG_S3_MAX_POOL_CONNECTIONS``
    is kept, and the part concurrency is lowered to fit it instead.
    """
    callers = max(1, int(callers))
    concurrency = settings.s3_transfer_max_concurrency
    if settings.s3_max_pool_connections is None:
        return callers * concurrency + SPARE_CONNECTIONS, concurrency
    pool = settings.s3_max_pool_connections
    return pool, max(1, min(concurrency, pool // callers))


def client_config(settings: StorageSettings, max_pool_connections: int | None = None) -> Config:
    """The botocore client configuration genimg uses for every S3 API (case C6).

    Args:
        settings: the S3 settings.
        max_pool_connections: connection pool size (default :func:`pool_size` for one caller).
    """
    if max_pool_connections is None:
        max_pool_connections = pool_size(settings)[0]
    return Config(
        region_name=settings.s3_region,
        signature_version="s3v4",
        s3={"addressing_style": settings.s3_addressing_style},
        retries={"mode": settings.s3_retry_mode, "total_max_attempts": settings.s3_max_attempts},
        max_pool_connections=max_pool_connections,
        connect_timeout=settings.s3_connect_timeout_s,
        read_timeout=settings.s3_read_timeout_s,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        tcp_keepalive=True,
        user_agent_extra="genimg",
    )


def _attempt_error(response: Any, caught_exception: BaseException | None) -> tuple[str, bool] | None:
    """``(code, throttled)`` of a failed, retryable-looking attempt; ``None`` for a success or a final answer."""
    if caught_exception is not None:
        return type(caught_exception).__name__, False
    if not response:
        return None
    http, parsed = response
    status = int(getattr(http, "status_code", 0) or 0)
    code = str(((parsed or {}).get("Error") or {}).get("Code") or "")
    if status < 400 and not code:
        return None
    throttled = status in (429, 503) or code in THROTTLE_CODES
    if not (throttled or status in RETRYABLE_STATUS or code in UNAVAILABLE_CODES):
        return None  # 404, 403, 400 …: answers, not faults
    return code or str(status), throttled


def _on_needs_retry(response: Any = None, caught_exception: BaseException | None = None, operation: Any = None,
                    request_dict: dict[str, Any] | None = None, **_: Any) -> None:
    """``needs-retry.s3``: runs after every attempt; counts throttles, marks the attempt for the retry count.

    Returns ``None`` always, so botocore's own retry handler alone decides.
    """
    found = _attempt_error(response, caught_exception)
    if found is None:
        return None
    from genimg import metrics

    code, throttled = found
    name = getattr(operation, "name", "unknown")
    if throttled:
        metrics.S3_THROTTLED.labels(name, code).inc()
    if request_dict is not None:
        request_dict.setdefault("context", {})["genimg_failed_attempt"] = (name, code)
    return None


def _on_request_created(request: Any = None, **_: Any) -> None:
    """``request-created.s3``: an attempt after a failed one is a retry: count it under the failure's code."""
    context = getattr(request, "context", None)
    if isinstance(context, dict):
        failed = context.pop("genimg_failed_attempt", None)
        if failed is not None:
            from genimg import metrics

            metrics.S3_RETRIES.labels(*failed).inc()


def count_s3_attempts(client: Any) -> None:
    """Register the throttle and retry counters' botocore event hooks on an S3 ``client``."""
    client.meta.events.register("needs-retry.s3", _on_needs_retry, unique_id="genimg-count-needs-retry")
    client.meta.events.register("request-created.s3", _on_request_created, unique_id="genimg-count-retries")

