"""Keep credentials out of logs (case C7), even with the AWS SDK at DEBUG.

botocore logs whole prepared requests (``Authorization`` header, session
token), canonical requests and signatures at DEBUG. :data:`REDACTION`, a
:class:`SecretRedactingFilter`, rewrites such records; :func:`install_secret_redaction`
attaches it to the SDK's loggers and registers literal secrets.
:class:`genimg.stores.s3.S3Store` calls it with its credentials; a process's
logging setup may also add :data:`REDACTION` to its handlers.
"""

from __future__ import annotations

import logging
import re
import threading


class SecretRedactingFilter(logging.Filter):
    """A logging filter that rewrites records so no credential can be printed.

    It removes ``AWS4-HMAC-SHA256 Credential=... Signature=...`` header
    values, ``Signature=``/``Credential=`` fragments (headers and presigned
    query strings), the hex signature botocore's signer logs,
    ``x-amz-security-token`` values, ``Authorization`` values, and every
    literal secret registered with :meth:`add_secret`. Records are always let
    through (the filter returns True); only their text changes.

    Attach it to handlers as well (``handler.addFilter(REDACTION)``) to cover
    loggers created after :func:`install_secret_redaction` ran.
    """

    _PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
        (re.compile(r"AWS4-HMAC-SHA256\s+Credential=[^'\"\r\n]*"), "AWS4-HMAC-SHA256 <redacted>"),
        (re.compile(r"(?i)(?:X-Amz-)?Signature=[^&\s'\",;]*"), "<redacted-signature>"),
        (re.compile(r"(?i)(?:X-Amz-)?Credential=[^&\s'\",;]*"), "<redacted-credential>"),
        (re.compile(r"(?i)(signature:\s*)[0-9a-f]{64}"), r"\1<redacted>"),
        (
            re.compile(r"(?i)((?:x-amz-security-token|authorization)['\"]?\s*[:=]\s*b?['\"]?)[^'\"\r\n,;&}]+"),
            r"\1<redacted>",
        ),
        (
            re.compile(
                r"(?i)((?:aws_)?(?:secret_access_key|session_token|access_key_id)['\"]?\s*[:=]\s*['\"]?)"
                r"[^'\"\s,;}]+"
            ),
            r"\1<redacted>",
        ),
    )

    def __init__(self) -> None:
        super().__init__()
        self._secrets: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def add_secret(self, value: str | None) -> None:
        """Redact this literal string wherever it appears (values shorter than 4 are ignored)."""
        if value and len(value) >= 4:
            with self._lock:
                self._secrets = self._secrets | {value}

    def redact(self, text: str) -> str:
        """Return ``text`` with every credential pattern and registered secret replaced."""
        for pattern, repl in self._PATTERNS:
            text = pattern.sub(repl, text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "<redacted>")
        return text

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging API
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: keep its raw text
            message = str(record.msg)
        redacted = self.redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


REDACTION = SecretRedactingFilter()
"""The process-wide redacting filter (see :func:`install_secret_redaction`)."""

_REDACTED_LOGGER_ROOTS = ("botocore", "boto3", "s3transfer", "urllib3")
_KNOWN_CHATTY_LOGGERS = (
    "botocore.auth",
    "botocore.endpoint",
    "botocore.parsers",
    "botocore.hooks",
    "botocore.credentials",
    "botocore.httpsession",
    "botocore.retryhandler",
    "botocore.retries.standard",
    "botocore.retries.adaptive",
    "botocore.utils",
    "botocore.client",
    "urllib3.connectionpool",
    "s3transfer.tasks",
    "s3transfer.upload",
    "s3transfer.futures",
)


def install_secret_redaction(*secrets: str | None) -> None:
    """Register ``secrets`` and attach :data:`REDACTION` to the AWS SDK's loggers.

    Idempotent. A logger filter only sees records created on that very logger,
    so the filter is added to every existing logger under ``botocore``,
    ``boto3``, ``s3transfer`` and ``urllib3`` plus the ones known to log
    requests, credentials or signatures.

    Args:
        secrets: literal values to redact (access key id, secret, session token).
    """
    for secret in secrets:
        REDACTION.add_secret(secret)
    names = set(_KNOWN_CHATTY_LOGGERS) | set(_REDACTED_LOGGER_ROOTS)
    names |= {
        name
        for name in list(logging.Logger.manager.loggerDict)
        if name.split(".", 1)[0] in _REDACTED_LOGGER_ROOTS
    }
    for name in sorted(names):
        target = logging.getLogger(name)
        if REDACTION not in target.filters:
            target.addFilter(REDACTION)


def redact_all_handlers() -> int:
    """Attach :data:`REDACTION` to every handler of the root logger and of every named logger.

    A handler filter sees every record the handler writes, whichever logger it
    came from. Call it again whenever a framework has installed handlers of its
    own (Celery adds them to the root, ``celery.task`` and ``multiprocessing``
    loggers when a worker starts).

    Returns:
        How many handlers got the filter now.
    """
    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    added = 0
    for logger in loggers:
        for handler in list(logger.handlers):
            if REDACTION not in handler.filters:
                handler.addFilter(REDACTION)
                added += 1
    return added


def redact_url(url: str) -> str:
    """``url`` with its password (``redis://user:PASSWORD@host``) replaced by ``***``.

    Use it whenever a connection URL goes into a log line, an error message or
    CLI output. Query-string credentials (``?password=...``) are masked too.
    A string that is not a URL comes back unchanged.
    """
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    out = url
    if "@" in parts.netloc:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        if sep:
            out = out.replace(parts.netloc, f"{user}:***@{hostport}", 1)
    if parts.query:
        query = re.sub(r"(?i)((?:^|&)(?:password|passwd|pass|token)=)[^&]*", r"\1***", parts.query)
        out = out.replace(f"?{parts.query}", f"?{query}", 1)
    return out


def register_url_secret(url: str) -> None:
    """Register the password of a connection URL with :data:`REDACTION` (no-op without one)."""
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return
    if password:
        REDACTION.add_secret(password)
        REDACTION.add_secret(unquote(password))
