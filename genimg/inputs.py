"""Streaming prompt readers and the stored prompt-chunk format.

A txt2img job's prompts are never held in memory whole: :func:`iter_prompts`
reads a list, a text file, JSONL, CSV or Parquet one prompt at a time and
validates each (:func:`genimg.limits.prompt_problem`); :func:`chunk_prompts` cuts
the stream into lists of ``prompt_chunk_size``; the producer stores each list
with :func:`encode_prompt_chunk` under :func:`prompt_chunk_key` (relative to
``JobSpec.job_prefix``); a worker fetches only the chunks its shard needs
(:func:`prompt_chunks_for_items`) and reads them with :func:`decode_prompt_chunk`.

Chunk ``c`` holds prompts ``[c * chunk_size, (c + 1) * chunk_size)``.

Every problem is a :class:`genimg.errors.ValidationError` with ``field="prompts"``
whose message says where (``line N`` for text, JSONL and CSV, counting every
physical line from 1; ``row N`` for Parquet, from 1; ``index N`` for a Python
iterable, from 0) and what is wrong.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Final

from genimg.errors import ValidationError
from genimg.limits import MAX_PROMPT_BYTES, MAX_PROMPT_CHUNK_SIZE, MAX_TOTAL_ITEMS, prompt_problem
from genimg.shardplan import item_to_prompt_index

FORMATS: Final = ("text", "jsonl", "csv", "parquet")
"""Prompt file formats; ``fmt=None`` infers one from the suffix (see ``SUFFIX_FORMATS``)."""

SUFFIX_FORMATS: Final = {".txt": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
                         ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

DEFAULT_COLUMN: Final = "prompt"
"""Field (JSONL) or column (CSV, Parquet) read when ``column`` is not given."""

MAX_RECORD_BYTES: Final = 1024 * 1024
"""Longest physical line read from a JSONL or CSV file (bounds memory on hostile files)."""

PARQUET_BATCH_ROWS: Final = 4_096
"""Rows per record batch read from Parquet."""

MAX_PROMPT_CHUNK_BYTES: Final = 2 * MAX_PROMPT_BYTES * MAX_PROMPT_CHUNK_SIZE + 2
"""Largest encoded chunk :func:`decode_prompt_chunk` accepts (every prompt at the
byte limit and fully escaped), ~160 MB; default-sized chunks are far smaller."""

_FIELD = "prompts"


def _error(where: str, problem: str) -> ValidationError:
    return ValidationError(f"{where}: {problem}", field=_FIELD)


# --------------------------------------------------------------------------- reading


def iter_prompts(source: str | os.PathLike[str] | Iterable[str], column: str | None = None,
                 fmt: str | None = None) -> Iterator[str]:
    """Yield validated prompts from ``source``, streaming, in order.

    Sources:

    - a Python iterable of ``str`` (a list, a generator, ...);
    - a path (``str`` or ``os.PathLike``; a plain ``str`` is always a path) to
      a file whose format comes from ``fmt`` or its suffix:

      - ``text``: one prompt per line, strict UTF-8 (a leading BOM is
        dropped). Only the line ending (``\\n`` or ``\\r\\n``) is stripped;
        other whitespace is kept. Blank and whitespace-only lines are
        **skipped**, so a text file cannot express the empty prompt.
      - ``jsonl``: one JSON object per line with a string field ``column``;
        blank lines are skipped.
      - ``csv``: a header row naming ``column``, then one row per prompt
        (the csv module's default "excel" dialect); blank lines are skipped.
      - ``parquet``: a string column ``column``, read in record batches of
        ``PARQUET_BATCH_ROWS`` (needs pyarrow).

    ``""`` from JSONL, CSV, Parquet or a list is kept (it means "no prompt").
    Format, column and file existence are checked at call time; everything
    else as the stream is read. A source that yields no prompt at all is an
    error, raised when the stream ends (so consume the stream fully before
    committing anything built from it).

    Args:
        source: the prompts, as above.
        column: field or column for jsonl/csv/parquet (default ``"prompt"``);
            must be ``None`` for text files and iterables.
        fmt: one of ``FORMATS``, overriding the suffix.

    Raises:
        ValidationError: ``field="prompts"``; the message gives the line, row
            or index and the problem (invalid UTF-8, missing column, prompt too
            long, control character, no prompts, ...).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        kind = _format_of(path, fmt)
        if kind == "text":
            _no_column(column, "text files")
        if not path.exists():
            raise ValidationError(f"file not found: {str(path)!r}", field=_FIELD)
        column = column or DEFAULT_COLUMN
        readers = {"text": lambda: _iter_text(path), "jsonl": lambda: _iter_jsonl(path, column),
                   "csv": lambda: _iter_csv(path, column), "parquet": lambda: _iter_parquet(path, column)}
        reader = readers[kind]()
        empty = f"no prompts in {path.name!r}" + (" (blank lines are skipped)" if kind != "parquet" else "")
    elif isinstance(source, (bytes, bytearray)) or not isinstance(source, Iterable):
        raise ValidationError(f"must be a file path or an iterable of str (got {type(source).__name__})",
                              field=_FIELD)
    else:
        if fmt is not None:
            raise ValidationError("fmt applies to files only, not to an iterable", field=_FIELD)
        _no_column(column, "an iterable of str")
        reader = _iter_iterable(source)
        empty = "no prompts given (the iterable is empty)"
    return _counted(reader, empty)


def _counted(reader: Iterator[str], empty: str) -> Iterator[str]:
    n = 0
    for n, prompt in enumerate(reader, 1):  # noqa: B007 - n is read after the loop
        if n > MAX_TOTAL_ITEMS:
            raise ValidationError(f"more than {MAX_TOTAL_ITEMS:,} prompts", field=_FIELD)
        yield prompt
    if n == 0:
        raise ValidationError(empty, field=_FIELD)


def _no_column(column: str | None, what: str) -> None:
    if column is not None:
        raise ValidationError(f"column applies to jsonl, csv and parquet, not to {what}",
                              field=_FIELD)


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValidationError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}",
                                  field="fmt")
        return fmt
    kind = SUFFIX_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValidationError(f"cannot tell the format of {path.name!r} from its suffix; "
                              f"use one of {', '.join(SUFFIX_FORMATS)} or pass fmt", field="fmt")
    return kind


def _checked(where: str, prompt: object) -> str:
    problem = prompt_problem(prompt)
    if problem is not None:
        raise _error(where, f"prompt {problem}")
    return prompt  # type: ignore[return-value]  # prompt_problem proved it is a str


def _iter_iterable(items: Iterable[object]) -> Iterator[str]:
    for i, item in enumerate(items):
        yield _checked(f"index {i}", item)


def _open(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")  # noqa: SIM115 - closed by the callers' with
    except FileNotFoundError:
        raise ValidationError(f"file not found: {str(path)!r}", field=_FIELD) from None
    except IsADirectoryError:
        raise ValidationError(f"is a directory, not a file: {str(path)!r}", field=_FIELD) from None
    except OSError as e:
        raise ValidationError(f"cannot open {str(path)!r}: {e.strerror}", field=_FIELD) from None


def _iter_lines(path: Path, max_bytes: int, keep_ending: bool = False) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text)`` of a UTF-8 file, reading at most ``max_bytes`` per line.

    Lines are split on ``\\n`` only and decoded one by one, so invalid UTF-8 is
    reported with its line (a UTF-8 sequence never contains the byte ``\\n``).
    """
    with _open(path) as f:
        lineno = 0
        while True:
            raw = f.readline(max_bytes + 5)  # + BOM + CRLF
            if not raw:
                return
            lineno += 1
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            body = raw[:-1] if raw.endswith(b"\n") else raw
            body = body[:-1] if body.endswith(b"\r") else body
            if len(body) > max_bytes:
                raise _error(f"line {lineno}", f"line is longer than {max_bytes:,} bytes "
                                               f"(prompt limit {MAX_PROMPT_BYTES:,} bytes)")
            try:
                text = (raw if keep_ending else body).decode("utf-8")
            except UnicodeDecodeError as e:
                raise _error(f"line {lineno}", f"invalid UTF-8 at byte {e.start} of the line") from None
            yield lineno, text


def _iter_text(path: Path) -> Iterator[str]:
    for lineno, line in _iter_lines(path, MAX_PROMPT_BYTES):
        if line.strip():
            yield _checked(f"line {lineno}", line)


def _iter_jsonl(path: Path, column: str) -> Iterator[str]:
    for lineno, line in _iter_lines(path, MAX_RECORD_BYTES):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error(where, f"invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise _error(where, "invalid JSON (nested too deeply)") from None
        if not isinstance(record, dict):
            raise _error(where, f"expected a JSON object, got {type(record).__name__}")
        if column not in record:
            raise _error(where, f"missing field {column!r}")
        value = record[column]
        if not isinstance(value, str):
            raise _error(where, f"field {column!r} must be a string, got "
                                f"{'null' if value is None else type(value).__name__}")
        yield _checked(where, value)


def _iter_csv(path: Path, column: str) -> Iterator[str]:
    lines = _iter_lines(path, MAX_RECORD_BYTES, keep_ending=True)
    state = {"line": 0}

    def feed() -> Iterator[str]:
        for lineno, text in lines:
            state["line"] = lineno
            yield text

    reader = csv.reader(feed(), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise _error("line 1", "empty file: expected a header row")
        if column not in header:
            shown = ", ".join(repr(h) for h in header[:20])
            raise _error(f"line {state['line']}", f"missing column {column!r} (header has {shown})")
        col = header.index(column)
        for row in reader:
            if not row:
                continue
            where = f"line {state['line']}"
            if col >= len(row):
                raise _error(where, f"row has {len(row)} fields, no value for column {column!r}")
            yield _checked(where, row[col])
    except csv.Error as e:
        text = str(e)
        if "field larger than field limit" in text:
            text = (f"a field is longer than {csv.field_size_limit():,} characters "
                    f"(prompt limit {MAX_PROMPT_BYTES:,} bytes)")
        raise _error(f"line {state['line']}", f"malformed CSV: {text}") from None


def _iter_parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow as pa  # imported here: only the producer reads Parquet
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValidationError(f"{path.name!r} is not a readable Parquet file: {e}", field=_FIELD) from None
    with pf:
        schema = pf.schema_arrow
        if column not in schema.names:
            shown = ", ".join(repr(n) for n in schema.names[:20])
            raise ValidationError(f"missing column {column!r} (file has {shown})", field=_FIELD)
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or getattr(pa.types, "is_string_view", lambda _t: False)(kind)):
            raise ValidationError(f"column {column!r} has type {kind}; expected a string column",
                                  field=_FIELD)
        row = 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    raise _error(f"row {row}", f"column {column!r} is null")
                yield _checked(f"row {row}", value)


# --------------------------------------------------------------------------- chunks


def chunk_prompts(prompts: Iterable[str], chunk_size: int) -> Iterator[list[str]]:
    """Cut a prompt stream into lists of ``chunk_size`` (the last may be shorter).

    Raises:
        ValidationError: ``field="prompt_chunk_size"`` if not in 1..``MAX_PROMPT_CHUNK_SIZE``.
    """
    _check_chunk_size(chunk_size)
    it = iter(prompts)
    while chunk := list(islice(it, chunk_size)):
        yield chunk


def prompts_digest(chunks: Iterable[list[str]]) -> tuple[int, str]:
    """Count and sha256 of a prompt stream (chunks from :func:`chunk_prompts`), without storing it.

    Each prompt is hashed as its JSON string plus ``\n``, in order, so the digest does not depend on
    the chunk size. Returns ``(num_prompts, hex digest)``.
    """
    h = PromptHasher()
    for chunk in chunks:
        h.update(chunk)
    return h.count, h.hexdigest()


class PromptHasher:
    """Running count and sha256 of prompts (see :func:`prompts_digest`)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.count = 0

    def update(self, prompts: list[str]) -> None:
        for prompt in prompts:
            self._h.update(json.dumps(prompt, ensure_ascii=False).encode("utf-8") + b"\n")
        self.count += len(prompts)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def encode_prompt_chunk(prompts: list[str]) -> bytes:
    """Serialise one chunk: a compact JSON array of strings, UTF-8, deterministic.

    Non-ASCII text is stored as UTF-8 (not ``\\u`` escapes); the same list
    always encodes to the same bytes, so a retried producer rewrites identical
    objects.

    Raises:
        ValidationError: if the list is empty, too long, or holds an invalid prompt.
    """
    _check_chunk(prompts, f"a list of 1..{MAX_PROMPT_CHUNK_SIZE:,} prompts")
    return json.dumps(prompts, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_prompt_chunk(data: bytes) -> list[str]:
    """Read one stored chunk back; the inverse of :func:`encode_prompt_chunk`.

    Raises:
        ValidationError: ``field="prompt_chunk"`` if the bytes are not such a
            chunk (corrupt or edited in storage) or hold an invalid prompt.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValidationError(f"must be bytes, got {type(data).__name__}", field="prompt_chunk")
    if len(data) > MAX_PROMPT_CHUNK_BYTES:
        raise ValidationError(f"is {len(data):,} bytes; the limit is {MAX_PROMPT_CHUNK_BYTES:,}",
                              field="prompt_chunk")
    try:
        value = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValidationError(f"is not a UTF-8 JSON array: {e}", field="prompt_chunk") from None
    return _check_chunk(value, f"a JSON array of 1..{MAX_PROMPT_CHUNK_SIZE:,} strings")


def _check_chunk(prompts: object, expected: str) -> list[str]:
    """``prompts`` if it is a list of 1..MAX_PROMPT_CHUNK_SIZE valid prompts.

    Raises:
        ValidationError: ``field="prompt_chunk"``: "must be {expected}", or the first invalid prompt.
    """
    if not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_PROMPT_CHUNK_SIZE:
        raise ValidationError(f"must be {expected}", field="prompt_chunk")
    for i, prompt in enumerate(prompts):
        problem = prompt_problem(prompt)
        if problem is not None:
            raise ValidationError(f"index {i}: prompt {problem}", field="prompt_chunk")
    return prompts


def prompt_chunk_key(chunk_index: int) -> str:
    """Storage key of chunk ``chunk_index`` relative to the job's prefix: ``prompts/000000042.json``."""
    if isinstance(chunk_index, bool) or not isinstance(chunk_index, int) \
            or not 0 <= chunk_index < MAX_TOTAL_ITEMS:
        raise ValidationError(f"must be an integer in [0, {MAX_TOTAL_ITEMS:,}) "
                              f"(got {chunk_index!r})", field="chunk_index")
    return f"prompts/{chunk_index:09d}.json"


def prompt_chunks_for_items(start: int, stop: int, images_per_prompt: int,
                            chunk_size: int) -> range:
    """Indices of the prompt chunks that items ``[start, stop)`` need.

    Item ``i`` renders prompt ``i // images_per_prompt``, which lives in chunk
    ``prompt // chunk_size``. An empty item range needs no chunk.

    Returns:
        a ``range`` of chunk indices (contiguous, ascending).
    """
    _check_chunk_size(chunk_size)
    if isinstance(start, bool) or isinstance(stop, bool) or not isinstance(start, int) \
            or not isinstance(stop, int) or not 0 <= start <= stop:
        raise ValidationError(f"need integers 0 <= start <= stop (got {start!r}, {stop!r})",
                              field="item_range")
    if start == stop:
        return range(0)
    first = item_to_prompt_index(start, images_per_prompt) // chunk_size
    last = item_to_prompt_index(stop - 1, images_per_prompt) // chunk_size
    return range(first, last + 1)


def _check_chunk_size(chunk_size: object) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) \
            or not 1 <= chunk_size <= MAX_PROMPT_CHUNK_SIZE:
        raise ValidationError(f"must be an integer in [1, {MAX_PROMPT_CHUNK_SIZE:,}] "
                              f"(got {chunk_size!r})", field="prompt_chunk_size")
