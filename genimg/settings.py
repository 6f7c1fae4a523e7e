"""Typed settings read from ``GENIMG_*`` environment variables.

Every quantity carries its unit in its name (``timeout_s``, ``max_bytes``).
Settings are frozen; build them with ``X.from_env()`` or keyword arguments.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

_PACKAGE_DIR = Path(__file__).resolve().parent

WEIGHTS_DIR = _PACKAGE_DIR / "models" / "weights"
"""Directory of the committed, trained PyTorch state dicts."""


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENIMG_", frozen=True, extra="ignore")

    @classmethod
    def from_env(cls, **overrides: object):  # noqa: ANN206 - pydantic returns Self
        """Read the environment, then apply keyword overrides."""
        return cls(**overrides)


class ModelSettings(_Base):
    """Where model artefacts live on the building machine."""

    cache_dir: Path = Field(default=Path(".cache/genimg"), description="ONNX exports and caches")
    weights_dir: Path = WEIGHTS_DIR


class TritonSettings(_Base):
    """How the worker reaches Triton."""

    triton_url: str = "127.0.0.1:8001"
    triton_protocol: str = Field(default="grpc", pattern="^(grpc|http)$")
    triton_timeout_s: float = Field(default=60.0, gt=0)
    triton_ready_timeout_s: float = Field(default=120.0, gt=0)
    triton_max_message_bytes: int = Field(default=256 * 1024 * 1024, gt=0)


class StorageSettings(_Base):
    """S3-compatible storage (AWS S3, MinIO, Ceph, moto, ...).

    Credentials, first match wins: ``GENIMG_S3_ACCESS_KEY_ID`` and
    ``GENIMG_S3_SECRET_ACCESS_KEY`` (optionally ``GENIMG_S3_SESSION_TOKEN``);
    else the mounted INI file ``GENIMG_S3_CREDENTIALS_FILE`` (AWS
    shared-credentials format, section ``GENIMG_S3_CREDENTIALS_PROFILE``); else
    boto3's standard chain (``AWS_*`` variables, web identity, instance role).
    ``s3_max_attempts`` counts every attempt, the first included.
    """

    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_addressing_style: str = Field(default="path", pattern="^(path|virtual|auto)$")
    s3_max_pool_connections: int = Field(default=16, gt=0)
    s3_max_attempts: int = Field(default=5, gt=0)
    s3_multipart_threshold_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_session_token: SecretStr | None = None
    s3_credentials_file: Path | None = Field(default=None, description="mounted AWS-style INI file")
    s3_credentials_profile: str = "default"
    s3_retry_mode: str = Field(default="standard", pattern="^(standard|adaptive)$")
    s3_connect_timeout_s: float = Field(default=10.0, gt=0)
    s3_read_timeout_s: float = Field(default=60.0, gt=0)
    s3_multipart_chunk_bytes: int = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024)
    s3_transfer_max_concurrency: int = Field(default=4, gt=0)
    s3_ca_bundle: Path | None = Field(default=None, description="PEM bundle for a private CA")


class SpecSettings(_Base):
    """What job-spec validation reads from the environment (``genimg.spec``).

    The numeric limits of a job are constants in ``genimg.spec`` (producer and
    worker must agree on them); only deployment-specific paths live here.
    """

    local_output_root: Path | None = Field(
        default=None,
        description="file:// outputs must resolve (symlinks followed) inside this directory "
        "[env GENIMG_LOCAL_OUTPUT_ROOT]; unset disables file:// outputs",
    )
