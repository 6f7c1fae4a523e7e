"""Prompt templates (issue 15): ``{a|b}`` alternatives, ``{prompt}`` and ``__wildcard__`` files.

Syntax: ``{prompt}`` is the item's source prompt; ``{a|b|c}`` is one alternative, uniform, drawn from
``numpy.random.default_rng(seed)`` in the order the groups appear (groups nest: ``{a {big|small}|b}``);
``__name__`` is one line of the wildcard file ``name``, uniform. The same (template, seed, wildcard
options) gives the same text on every machine. Used by :mod:`genimg.expand` (the job option and the
expansion stage), validated at submit.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genimg.errors import ValidationError

MAX_WILDCARD_OPTIONS = 100_000
"""Most lines of one wildcard file."""
MAX_WILDCARD_BYTES = 8 * 1024 * 1024
"""Largest wildcard file, in bytes."""
PROMPT_SLOT = "prompt"
"""``{prompt}`` in a template is the item's source prompt."""
_WILDCARD_RE = re.compile(r"__([A-Za-z0-9](?:[A-Za-z0-9.-]|_(?!_))*)__")


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Slot:
    """``{prompt}``."""


@dataclass(frozen=True)
class _Wildcard:
    name: str


@dataclass(frozen=True)
class _Choice:
    options: tuple[tuple, ...]
    """Each option is a sequence of nodes."""


@dataclass(frozen=True)
class Template:
    """A parsed template: nodes of text, ``{prompt}``, ``__wildcard__`` and ``{a|b}`` choices."""

    source: str
    nodes: tuple

    @property
    def wildcards(self) -> list[str]:
        """The wildcard names the template uses, in order of first use."""
        found: dict[str, None] = {}

        def walk(nodes):
            for n in nodes:
                if isinstance(n, _Wildcard):
                    found[n.name] = None
                elif isinstance(n, _Choice):
                    for o in n.options:
                        walk(o)

        walk(self.nodes)
        return list(found)

    @property
    def is_literal(self) -> bool:
        """True when the template is exactly ``{prompt}`` (expansion leaves the prompt unchanged)."""
        return self.nodes == (_Slot(),)

    def render(self, prompt: str, seed: int, wildcards: Mapping[str, Sequence[str]]) -> str:
        """Expand for one unit: ``{prompt}`` → ``prompt``; each choice uniform from ``default_rng(seed)``.

        Raises:
            KeyError: a wildcard missing from ``wildcards`` (validated at submit, so a worker never sees it).
        """
        rng = np.random.default_rng(seed)
        out: list[str] = []

        def walk(nodes):
            for n in nodes:
                if isinstance(n, _Text):
                    out.append(n.text)
                elif isinstance(n, _Slot):
                    out.append(prompt)
                elif isinstance(n, _Wildcard):
                    options = wildcards[n.name]
                    out.append(options[int(rng.integers(len(options)))])
                else:
                    walk(n.options[int(rng.integers(len(n.options)))])

        walk(self.nodes)
        return "".join(out)


MAX_DEPTH = 32
"""Deepest nesting of ``{...}`` groups a template may have (parsing and rendering recurse per level; Python's
stack is the limit otherwise, and it is shallower in a worker than in the producer)."""


def parse_template(text: str) -> Template:
    """Parse a template (see the module docstring for its syntax).

    Raises:
        ValueError: unbalanced ``{``/``}``, a ``|`` outside braces, groups nested deeper than
            :data:`MAX_DEPTH`, or a group that is neither ``{prompt}`` nor has two or more
            alternatives; the message gives the character position.
    """
    pos = 0

    def parse(depth: int) -> tuple[list[tuple], int]:
        nonlocal pos
        options: list[tuple] = []
        current: list = []
        buf: list[str] = []

        def flush():
            if buf:
                current.extend(_split_wildcards("".join(buf)))
                buf.clear()

        start = pos - 1
        while pos < len(text):
            ch = text[pos]
            pos += 1
            if ch == "{":
                if depth >= MAX_DEPTH:
                    raise ValueError(f"groups nest deeper than {MAX_DEPTH} levels at character {pos - 1}")
                flush()
                inner = parse(depth + 1)
                current.append(inner)
            elif ch == "}":
                if depth == 0:
                    raise ValueError(f"unbalanced '}}' at character {pos - 1} (no '{{' before it)")
                flush()
                options.append(tuple(current))
                return options, start
            elif ch == "|":
                if depth == 0:
                    raise ValueError(f"'|' at character {pos - 1} is outside any {{...}} group")
                flush()
                options.append(tuple(current))
                current = []
            else:
                buf.append(ch)
        if depth > 0:
            raise ValueError(f"unbalanced '{{' at character {start}: no '}}' closes it")
        flush()
        options.append(tuple(current))
        return options, start

    def build(nodes_or_group) -> tuple:
        out: list[object] = []
        for n in nodes_or_group:
            if isinstance(n, tuple) and len(n) == 2 and isinstance(n[0], list):
                options, at = n
                if len(options) == 1:
                    only = options[0]
                    if len(only) == 1 and isinstance(only[0], _Text) and only[0].text == PROMPT_SLOT:
                        out.append(_Slot())
                        continue
                    raise ValueError(f"the group at character {at} has one alternative; write {{a|b}} "
                                     f"for a choice or {{{PROMPT_SLOT}}} for the source prompt")
                out.append(_Choice(tuple(build(o) for o in options)))
            else:
                out.append(n)
        return tuple(out)

    top, _ = parse(0)
    return Template(text, build(top[0]))


def _split_wildcards(text: str) -> list:
    out: list = []
    last = 0
    for m in _WILDCARD_RE.finditer(text):
        if m.start() > last:
            out.append(_Text(text[last:m.start()]))
        out.append(_Wildcard(m.group(1)))
        last = m.end()
    if last < len(text):
        out.append(_Text(text[last:]))
    return out


# --------------------------------------------------------------------------- wildcard files


def read_wildcard_file(path: Path) -> list[str]:
    """The options of one wildcard file: its non-blank lines not starting with ``#``, stripped.

    Raises:
        ValidationError: ``field="expand.wildcards_dir"``: the file is missing, unreadable, too
            large, not UTF-8, or has no options.
    """
    field = "expand.wildcards_dir"
    if not path.is_file():
        raise ValidationError(f"wildcard file {str(path)!r} does not exist", field=field)
    if path.stat().st_size > MAX_WILDCARD_BYTES:
        raise ValidationError(f"wildcard file {str(path)!r} is over {MAX_WILDCARD_BYTES:,} bytes", field=field)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValidationError(f"cannot read wildcard file {str(path)!r}: {e}", field=field) from e
    options = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not options:
        raise ValidationError(f"wildcard file {str(path)!r} has no options", field=field)
    if len(options) > MAX_WILDCARD_OPTIONS:
        raise ValidationError(f"wildcard file {str(path)!r} has {len(options):,} options; the limit is "
                              f"{MAX_WILDCARD_OPTIONS:,}", field=field)
    return options


def wildcards_json(options: Mapping[str, Sequence[str]]) -> bytes:
    """The stored form of a job's wildcard options: canonical JSON (sorted names), UTF-8."""
    return json.dumps({k: list(options[k]) for k in sorted(options)}, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def wildcards_sha256(options: Mapping[str, Sequence[str]]) -> str:
    """sha256 of :func:`wildcards_json`: what the spec pins."""
    return hashlib.sha256(wildcards_json(options)).hexdigest()
