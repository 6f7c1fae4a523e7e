"""Finding and reading profile files: the profiles directory shared by producer, workers and builder.

The directory is ``GENIMG_PROFILES_DIR`` when set, else the profiles bundled
with genimg (``genimg/profiles/bundled/``). Every ``*.toml`` file in it is one
profile whose ``name`` must equal the file's stem. A malformed file is
reported with its path and the first problem, and never hides the valid ones.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pydantic

from genimg.errors import ValidationError
from genimg.profiles.schema import ModelProfile

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
"""The profiles that ship with genimg."""
ENV_VAR = "GENIMG_PROFILES_DIR"
MAX_PROFILE_BYTES = 256 * 1024
"""Largest profile file read."""


def profiles_dir() -> Path:
    """``GENIMG_PROFILES_DIR`` if set (and non-empty), else :data:`BUNDLED_DIR`."""
    value = os.environ.get(ENV_VAR, "").strip()
    return Path(value) if value else BUNDLED_DIR


def _first_error(e: pydantic.ValidationError) -> str:
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in err.get("loc", ())) or "profile"
    msg = str(err.get("msg", "is invalid"))
    more = f" [{e.error_count() - 1} more]" if e.error_count() > 1 else ""
    return f"{loc}: {msg}{more}"


def read_profile(path: str | os.PathLike[str]) -> ModelProfile:
    """Read and validate one profile file.

    Raises:
        ValidationError: ``field="profile"``, with the path and the first problem (unreadable,
            too large, not TOML, an invalid or unknown key, a name that differs from the file's stem).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ValidationError(f"{p}: cannot be read ({e.strerror})", field="profile") from e
    if len(data) > MAX_PROFILE_BYTES:
        raise ValidationError(f"{p}: {len(data):,} bytes; the limit is {MAX_PROFILE_BYTES:,}", field="profile")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValidationError(f"{p}: not valid TOML: {e}", field="profile") from e
    try:
        profile = ModelProfile.model_validate(doc)
    except pydantic.ValidationError as e:
        raise ValidationError(f"{p}: {_first_error(e)}", field="profile") from e
    if profile.name != p.stem:
        raise ValidationError(f"{p}: name {profile.name!r} differs from the file name {p.stem!r}", field="profile")
    return profile


@dataclass
class Profiles:
    """The valid profiles of a directory, and the files that failed (path → reason).

    Attributes:
        directory: where they were read from.
        profiles: name → profile.
        errors: path → why the file was not loaded.
    """

    directory: Path
    profiles: dict[str, ModelProfile] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def get(self, name: object) -> ModelProfile:
        """The profile called ``name``.

        Raises:
            ValidationError: ``field="model"``, listing the profiles there are (and any broken file
                that may have been meant).
        """
        if isinstance(name, str) and name in self.profiles:
            return self.profiles[name]
        known = ", ".join(sorted(self.profiles)) or "none"
        shown = repr(name) if len(repr(name)) <= 70 else repr(name)[:67] + "..."
        broken = [p for p in self.errors if isinstance(name, str) and Path(p).stem == name]
        hint = f"; {broken[0]} failed to load: {self.errors[broken[0]]}" if broken else ""
        raise ValidationError(f"no profile {shown} in {self.directory} (profiles: {known}){hint}", field="model")

    def resolve(self, name: object, *, upscale: bool = True) -> ModelProfile:
        """The profile a job naming ``name`` runs: its ``without_upscale`` variant when ``upscale`` is false.

        Raises:
            ValidationError: ``field="model"`` for an unknown profile; ``field="upscale"`` when
                ``upscale`` is false and the profile has no variant without upscaling.
        """
        profile = self.get(name)
        if upscale:
            return profile
        if profile.without_upscale is None:
            raise ValidationError(f"profile {profile.name!r} has no variant without upscaling", field="upscale")
        return self.get(profile.without_upscale)

    def triton_models(self) -> list[str]:
        """Every Triton model or ensemble these profiles call (their prompt stages included), sorted."""
        names = {p.triton_model for p in self.profiles.values()}
        names |= {p.prompt_stage.model for p in self.profiles.values() if p.prompt_stage}
        return sorted(names)


def load_profiles(directory: str | os.PathLike[str] | None = None) -> Profiles:
    """Read every ``*.toml`` profile in ``directory`` (default :func:`profiles_dir`).

    Malformed files are logged and listed in ``errors``; they never stop the others from loading.

    Raises:
        ValidationError: ``field="profiles_dir"`` when the directory does not exist.
    """
    d = Path(directory) if directory is not None else profiles_dir()
    if not d.is_dir():
        raise ValidationError(f"{d} is not a directory ({ENV_VAR})", field="profiles_dir")
    out = Profiles(d)
    for path in sorted(d.glob("*.toml")):
        try:
            out.profiles[path.stem] = read_profile(path)
        except ValidationError as e:
            out.errors[str(path)] = str(e).removeprefix("profile: ")
            log.warning("skipping profile %s", e)
    return out
