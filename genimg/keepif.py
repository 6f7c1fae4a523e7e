"""The quality filter: a job's ``keep_if`` predicate on one numeric metadata column, and its bookkeeping.

A job may ask to keep only the images whose metadata passes a predicate
``<column> <op> <number>`` (``score >= 0.9``), with ``regenerate = N``: an item
that fails is made again, from a new seed each time (:func:`genimg.seeds.attempt_seed`),
up to ``N`` extra times. The item keeps the first image that passes; its seed
goes in the ``seed`` column and the number of seeds tried in ``tries``
(:data:`KEEP_IF_COLUMNS`, 1 when attempt 0 passed). An item that never
passes within ``1 + N`` tries is a failed item with reason ``keep_if_unmet``
(:data:`KEEP_IF_UNMET`): its row holds the last seed tried and that image's
metadata, and the shard (and the job) still finishes.

The column must be one of the profile's metadata columns of type ``int`` or
``float``; a null value (a non-finite float) never passes. Other failures are
not regenerated: a non-finite image stays ``non_finite_output`` (retried once
with the same seed, case C9: a model fault, not a quality miss) and a failed
prompt expansion stays ``expansion_empty``/``expansion_too_long``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

MAX_REGENERATE: Final = 64
"""Most extra seeds one item may try (``regenerate``), so an item costs at most 65 inferences."""
MAX_KEEP_IF_CHARS: Final = 128
"""Longest ``keep_if`` text accepted."""
KEEP_IF_UNMET: Final = "keep_if_unmet"
"""Failure reason of an item none of whose ``1 + regenerate`` images passed ``keep_if``."""
KEEP_IF_COLUMNS: Final = {"tries": "int"}
"""Index/manifest columns a job with ``keep_if`` adds: ``tries``, the seeds tried for the item (>= 1)."""
MAX_SHARD_TRIES: Final = 16_384
"""Most images one shard of a ``keep_if`` job may have to make, ``shard_size * (1 + regenerate)``: a shard
must finish within the worker's task time limit (``GENIMG_TASK_SOFT_TIME_LIMIT_S``, 210 s by default) even
when no item passes; 16,384 digit images take ~35 s on one busy CPU core. A job that does not give
``shard_size`` gets ``min(1000, MAX_SHARD_TRIES // (1 + regenerate))``."""
NUMERIC_TYPES: Final = ("int", "float")
"""Metadata column types ``keep_if`` may test."""

OPS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq, "!=": operator.ne}
"""The comparison operators, by their spelling."""

# ASCII only: Python's \d and float() also take other scripts' digits (``٠.٩``), which the stored text would hide.
_RULE_RE = re.compile(r"^\s*([a-z][a-z0-9_]{0,63})\s*(>=|<=|==|!=|>|<)\s*([^\s<>=!]\S*)\s*$", re.ASCII)
_NUMBER_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$", re.ASCII)
_INT_RE = re.compile(r"^[+-]?\d+$", re.ASCII)


@dataclass(frozen=True)
class KeepIf:
    """A parsed ``keep_if``: ``column op value``.

    Attributes:
        column: the metadata column tested.
        op: one of :data:`OPS` (``>=``, ``>``, ``<=``, ``<``, ``==``, ``!=``).
        value: the finite number compared with (an int when written without a point or exponent).
    """

    column: str
    op: str
    value: int | float

    def __str__(self) -> str:
        """The canonical text, ``"score >= 0.9"`` (what the stored spec holds)."""
        return f"{self.column} {self.op} {self.value!r}"

    def passes(self, metadata: Mapping[str, Any]) -> bool:
        """Whether an item's metadata passes; a missing or null value (non-finite float) never does."""
        x = metadata.get(self.column)
        if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        if isinstance(x, float) and not math.isfinite(x):
            return False
        return bool(OPS[self.op](x, self.value))


def parse_keep_if(text: object) -> KeepIf:
    """Parse ``"<column> <op> <number>"`` (spaces optional): ``"score >= 0.9"``, ``"label==7"``.

    Raises:
        ValueError: saying what is wrong (not a str, too long, bad form, unknown operator,
            not a finite number); :class:`genimg.spec.JobSpec` reports it as ``field="keep_if"``.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a str such as 'score >= 0.9', not {type(text).__name__}")
    if len(text) > MAX_KEEP_IF_CHARS:
        raise ValueError(f"is {len(text):,} characters long; the limit is {MAX_KEEP_IF_CHARS}")
    m = _RULE_RE.match(text)
    if m is None:
        raise ValueError(f"must read '<column> <op> <number>' with op one of {', '.join(OPS)} "
                         f"(e.g. 'score >= 0.9'); got {text!r}")
    column, op, number = m.groups()
    if not _NUMBER_RE.match(number):
        raise ValueError(f"compares with {number!r}, which is not a decimal number")
    value: int | float = int(number) if _INT_RE.match(number) else float(number)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"compares with {number!r}, which is not a finite number")
    if isinstance(value, int) and abs(value) > 2**53:
        raise ValueError(f"compares with {number!r}; integers beyond 2**53 are not exact in every reader")
    return KeepIf(column, op, value)


def check_column(rule: KeepIf, columns: Mapping[str, str], profile: str) -> None:
    """Check that ``rule`` tests one of the profile's numeric metadata columns.

    Args:
        rule: the parsed predicate.
        columns: the profile's metadata columns, name → declared type.
        profile: the profile's name (for the message).

    Raises:
        ValueError: an unknown column (naming the numeric ones) or a non-numeric one.
    """
    numeric = [c for c, t in columns.items() if t in NUMERIC_TYPES]
    known = ", ".join(numeric) or "none"
    if rule.column not in columns:
        raise ValueError(f"tests column {rule.column!r}, which profile {profile!r} does not declare "
                         f"(its numeric metadata columns: {known})")
    if columns[rule.column] not in NUMERIC_TYPES:
        raise ValueError(f"tests column {rule.column!r} of type {columns[rule.column]}; keep_if needs an int or "
                         f"float column (profile {profile!r}: {known})")
