"""genimg's one exception tree.

Only the modules that talk to tritonclient, botocore or redis catch those
libraries' errors; they re-raise one of these with ``raise ... from e``. Task
code decides retry versus permanent failure on these types alone.
"""

from __future__ import annotations


class GenImgError(Exception):
    """Base class of every error genimg raises on purpose."""


class RetryableError(GenImgError):
    """A transient fault: retrying the same work later can succeed."""


class PermanentError(GenImgError):
    """A fault that retrying the same input cannot fix."""


class ValidationError(PermanentError, ValueError):
    """User input (job spec, prompt, option) is invalid.

    Attributes:
        field: dotted name of the offending field, or ``""`` when not tied to one.
    """

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class ConfigError(PermanentError):
    """Settings are inconsistent (e.g. visibility timeout below the hard time limit)."""


class ModelError(PermanentError):
    """A model file is missing, malformed, or produced unusable output."""


class ModelFetchError(ModelError):
    """A pretrained model's package could not be fetched from its registry.

    The message names the package, its version and the client command that failed.
    """


class ModelIntegrityError(ModelError):
    """A fetched package, a file inside it or a cached model does not match its recorded sha256.

    The message names the package (or cache path), the expected and the actual hash.
    """


class NonFiniteOutputError(ModelError):
    """The generator returned NaN or infinite values (reason ``non_finite_output``)."""

    reason = "non_finite_output"


class InferenceUnavailableError(RetryableError):
    """Triton is unreachable, not ready, or the model is not loaded."""


class InferenceTimeoutError(RetryableError):
    """A Triton request exceeded its timeout."""


class InferenceInvalidArgumentError(PermanentError):
    """Triton rejected the request's tensors (wrong name, dtype or shape)."""


class StorageError(GenImgError):
    """Base of S3-compatible storage faults."""


class StorageUnavailableError(StorageError, RetryableError):
    """S3 answered 5xx/throttling or the connection failed."""


class StorageNotFoundError(StorageError, PermanentError):
    """The object or bucket does not exist."""


class QueueUnavailableError(RetryableError):
    """Redis is unreachable."""


class PayloadTooLargeError(PermanentError):
    """A request or object exceeds a configured size limit."""


class ConflictError(PermanentError):
    """A request contradicts what is already stored (an idempotency key reused with a different spec).

    Attributes:
        key: the idempotency key (or other name) in conflict.
    """

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key
