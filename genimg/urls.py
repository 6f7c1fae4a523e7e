"""Output URLs: the one set of rules for ``s3://bucket/prefix`` and ``file:///dir`` (bucket names, key segments).

:func:`validate_output_url` checks a job's ``output`` and returns its normal form;
:func:`parse_s3_url` splits an ``s3://`` URL by the same rules. :data:`BUCKET_RE` and
:data:`SEGMENT_RE` are the bucket and key-segment patterns every store and layout uses.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

from genimg.errors import ValidationError
from genimg.limits import MAX_OUTPUT_URL_CHARS, short

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
"""An S3 bucket name: 3-63 of ``a-z 0-9 . -``, starting and ending alphanumeric (further rules in
:func:`validate_output_url`)."""
SEGMENT_RE = re.compile(r"^[A-Za-z0-9._=+@,-]+$")
"""One segment of a key prefix or local path: ``A-Za-z0-9 . _ - = + @ ,``."""
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")



def validate_output_url(url: str, *, local_output_root: Path | None) -> str:
    """Check an output URL and return its normal form.

    Accepted:

    - ``s3://bucket`` or ``s3://bucket/prefix``: bucket per S3's naming rules
      (3-63 of ``a-z 0-9 . -``, starts and ends alphanumeric, not an IP
      address, no ``..``, no reserved ``xn--``/``sthree-`` prefix or
      ``-s3alias``/``--ol-s3`` suffix); prefix segments non-empty, of
      ``A-Za-z0-9 . _ - = + @ ,`` only (so no spaces, backslashes, ``%``,
      ``?``, ``#`` or control characters), none ``.`` or ``..``. One trailing
      ``/`` is dropped.
    - ``file:///absolute/path`` only when ``local_output_root`` is set, the path
      obeys the same segment rules, and the path with symlinks resolved lies
      inside the resolved root; the normal form is the resolved path.

    Everything else (``http://``, ``ftp://``, ``S3://``, bare or relative paths,
    ``file://host/...``) is rejected. ``..`` is rejected anywhere in the URL.

    Args:
        url: the user's output URL, at most ``MAX_OUTPUT_URL_CHARS`` characters.
        local_output_root: directory that ``file://`` outputs must stay inside;
            ``None`` disables ``file://`` outputs.

    Raises:
        ValidationError: ``field="output"``, saying which rule the URL breaks.
    """

    def bad(why: str) -> ValidationError:
        return ValidationError(f"{why} (got {short(url)})", field="output")

    if not isinstance(url, str):
        raise bad("must be a str")
    if len(url) > MAX_OUTPUT_URL_CHARS:
        raise bad(f"is {len(url):,} characters long; the limit is {MAX_OUTPUT_URL_CHARS}")
    if ".." in url:
        raise bad("must not contain '..'")
    m = _SCHEME_RE.match(url)
    scheme = m.group(1) if m else ""
    if scheme == "s3" and url.startswith("s3://"):
        return _validate_s3_url(url, bad)
    if scheme == "file" and url.startswith("file://"):
        return _validate_file_url(url, local_output_root, bad)
    raise bad(f"unsupported {('scheme ' + repr(scheme)) if scheme else 'form (no scheme)'}; "
              "use s3://bucket/prefix, or file:///path under GENIMG_LOCAL_OUTPUT_ROOT")


def _check_segments(segments: list[str], bad: Any) -> None:
    for seg in segments:
        if seg == "":
            raise bad("must not contain empty path segments ('//')")
        if seg == ".":
            raise bad("must not contain '.' path segments")
        if not SEGMENT_RE.match(seg):
            raise bad(f"path segment {short(seg)} may only use letters, digits and . _ - = + @ ,")


def _validate_s3_url(url: str, bad: Any) -> str:
    rest = url[len("s3://"):]
    if rest.endswith("/"):
        rest = rest[:-1]
    bucket, _, prefix = rest.partition("/")
    if not BUCKET_RE.match(bucket):
        raise bad("bucket name must be 3-63 characters of a-z, 0-9, '.' and '-', "
                  "starting and ending with a letter or digit")
    if bucket.startswith(("xn--", "sthree-")) or bucket.endswith(("-s3alias", "--ol-s3")):
        raise bad("bucket name uses a prefix or suffix that S3 reserves")
    try:
        ipaddress.ip_address(bucket)
    except ValueError:
        pass
    else:
        raise bad("bucket name must not be formatted as an IP address")
    if prefix or rest.endswith("/"):
        _check_segments(prefix.split("/"), bad)
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def _validate_file_url(url: str, root: Path | None, bad: Any) -> str:
    if root is None:
        raise bad("file:// outputs are disabled; set GENIMG_LOCAL_OUTPUT_ROOT to allow a local directory")
    path = url[len("file://"):]
    if not path.startswith("/"):
        raise bad("file URLs must be file:///absolute/path (no host, no relative path)")
    body = path[1:].removesuffix("/")
    if body:
        _check_segments(body.split("/"), bad)
    resolved = Path(path).resolve()
    root_resolved = Path(root).resolve()
    if not resolved.is_relative_to(root_resolved):
        raise bad(f"local output must resolve inside the allowed root {str(root_resolved)!r}")
    return f"file://{resolved.as_posix()}"


def parse_s3_url(url: str, *, field: str = "output_url") -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix`` into ``("bucket", "some/prefix")`` by :func:`validate_output_url`'s rules.

    One trailing ``/`` is dropped; the prefix may be empty.

    Raises:
        ValidationError: ``field`` (default ``output_url``): not an ``s3://`` URL, an invalid bucket name,
            or a prefix with ``..``, ``.`` or empty segments, or characters outside :data:`SEGMENT_RE`.
    """
    try:
        if not isinstance(url, str) or not url.startswith("s3://"):
            raise ValidationError(f"expected s3://bucket/prefix (got {short(url)})", field="output")
        normal = validate_output_url(url, local_output_root=None)
    except ValidationError as e:
        raise ValidationError(str(e).removeprefix("output: "), field=field) from None
    bucket, _, prefix = normal[len("s3://"):].partition("/")
    return bucket, prefix
