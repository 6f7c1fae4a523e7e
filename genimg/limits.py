"""Every bound a job must stay within, and the prompt rules: producer and worker agree on them by importing them.

- the numeric limits of a job (``MAX_*``, :data:`DEFAULT_PROMPT_CHUNK_SIZE`), read by :mod:`genimg.spec`,
  :mod:`genimg.shardplan`, :mod:`genimg.inputs`, :mod:`genimg.seeds` and the Triton client;
- :func:`prompt_problem` / :func:`validate_prompt`: what a prompt may hold (``MAX_PROMPT_CHARS``, ...);
- :func:`check_int` / :func:`check_index`: an integer argument in range, or a ``ValidationError`` naming it;
- :func:`short`: a value for an error message, cut so a 1 MB input never lands in one.
"""

from __future__ import annotations

import numbers
import re
from typing import Final

from genimg.errors import ValidationError

MAX_PROMPT_CHARS: Final = 2_000
"""Longest prompt, in Unicode code points."""
MAX_PROMPT_BYTES: Final = 8_000
"""Longest prompt, in UTF-8 bytes (what Triton's BYTES tensor carries)."""

MAX_IMAGES_PER_PROMPT: Final = 64
MAX_SAFE_INTEGER: Final = 2**53 - 1
"""Largest integer every JSON reader holds exactly (JavaScript's numbers too): int parameters' bound, and
the item JSON writes larger ones (the uint64 seed) as decimal strings."""
MAX_SEED: Final = 2**63 - 1
"""Job seeds are in ``[0, MAX_SEED]`` (fits a signed 64-bit integer everywhere)."""
MAX_TOTAL_ITEMS: Final = 10**9
"""Most images one job may make (``count``, or ``num_prompts * images_per_prompt``)."""
MAX_SHARD_SIZE: Final = 10_000
"""Most items in one shard (one Celery task, one output .tar)."""
MAX_SHARDS: Final = 1_000_000
"""Most shards (task messages) one job may enqueue; raise ``shard_size`` for bigger jobs."""
MAX_SUB_BATCH_SIZE: Final = 256
"""Most items per Triton request batch inside a shard."""
MANIFEST_PART_ROWS: Final = 100_000
"""Rows a manifest part aims at when the job does not say (:func:`manifest_part_shards_for`)."""
MAX_MANIFEST_PART_SHARDS: Final = 1_000
"""Most shards one manifest part covers (:mod:`genimg.manifest`)."""
MAX_MANIFEST_PARTS: Final = 100_000
"""Most manifest parts of one job (``manifest/part-NNNNN.parquet``)."""
DEFAULT_PROMPT_CHUNK_SIZE: Final = 1_000
"""Prompts per stored prompt chunk (``prompts/NNNNNNNNN.json``); worst case ~16 MB."""
MAX_PROMPT_CHUNK_SIZE: Final = 10_000
MAX_OUTPUT_URL_CHARS: Final = 512
"""Longest output URL; leaves room under S3's 1,024-byte key limit for job and shard names."""
MAX_NAME_CHARS: Final = 64
MAX_IDEMPOTENCY_KEY_CHARS: Final = 256
MAX_SPEC_JSON_BYTES: Final = 256 * 1024
"""Largest stored ``job.json`` that :meth:`JobSpec.from_json` will parse."""
MAX_Z_DIM: Final = 4_096

# Unicode category Cc (C0, DEL, C1) except TAB, LF, CR.
_PROMPT_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


# --------------------------------------------------------------------------- prompts


def prompt_problem(text: object) -> str | None:
    """Say what is wrong with a prompt, or ``None`` when it is acceptable.

    The rules (checked in this order, cheapest first, so a 1 MB prompt is
    refused on its length without being scanned):

    - a ``str`` (not bytes);
    - at most ``MAX_PROMPT_CHARS`` (2,000) code points and ``MAX_PROMPT_BYTES``
      (8,000) UTF-8 bytes;
    - encodable as UTF-8 (no lone surrogates such as ``"\\ud800"``);
    - no control characters (Unicode category Cc: U+0000-U+001F, U+007F-U+009F)
      except tab, line feed and carriage return. **A NUL byte is rejected**
      at the producer with this error (case C5): numpy's fixed-width ``S``/``U``
      dtypes silently strip trailing NULs, so rejecting them is the only way to
      promise byte-identical prompts end to end.

    The empty prompt ``""`` is valid and means "no prompt" (unconditional
    generation through the txt2img path); so is a whitespace-only prompt, which
    is passed on unchanged.
    """
    if not isinstance(text, str):
        return f"must be a str, got {type(text).__name__}"
    n_chars = len(text)
    if n_chars > MAX_PROMPT_CHARS:
        return f"is {n_chars:,} characters long; the limit is {MAX_PROMPT_CHARS:,} characters"
    try:
        n_bytes = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        return (f"is not valid Unicode (lone surrogate U+{bad:04X} at character {e.start}); "
                "it cannot be encoded as UTF-8")
    if n_bytes > MAX_PROMPT_BYTES:
        return f"is {n_bytes:,} UTF-8 bytes long; the limit is {MAX_PROMPT_BYTES:,} bytes"
    m = _PROMPT_CONTROL_RE.search(text)
    if m is not None:
        return (f"contains control character U+{ord(m.group()):04X} at character {m.start()}; "
                "only tab, line feed and carriage return are allowed")
    return None


def validate_prompt(text: object) -> str:
    """Return ``text`` unchanged if it is an acceptable prompt (see :func:`prompt_problem`).

    Raises:
        ValidationError: with ``field="prompt"`` and the rule it breaks.
    """
    problem = prompt_problem(text)
    if problem is not None:
        raise ValidationError(f"prompt {problem}", field="prompt")
    return text  # type: ignore[return-value]  # prompt_problem proved it is a str


# --------------------------------------------------------------------------- argument checks


def short(value: object, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters, so a 1 MB input never lands in a message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(text):,} chars)"



def check_int(value: object, field: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not low <= int(value) <= high:
        raise ValidationError(f"must be an integer in [{low:,}, {high:,}] (got {short(value)})",
                              field=field)


def check_index(value: object, field: str, stop: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not 0 <= int(value) < stop:
        raise ValidationError(f"must be an integer in [0, {stop:,}) (got {short(value)})",
                              field=field)

