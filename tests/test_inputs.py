"""Streaming prompt readers and the stored prompt-chunk format (genimg.inputs)."""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from genimg.errors import ValidationError
from genimg.inputs import (
    chunk_prompts,
    decode_prompt_chunk,
    encode_prompt_chunk,
    iter_prompts,
    prompt_chunk_key,
    prompt_chunks_for_items,
)
from genimg.limits import MAX_PROMPT_CHARS
from genimg.shardplan import item_to_prompt_index

PROMPTS = ["a handwritten 7", "Ziffer sieben – ß", "七 (seven)", "emoji 🔢 digit", "tab\tinside",
           "x" * MAX_PROMPT_CHARS, "quote \" and comma, here"]


def _write_parquet(path: Path, columns: dict[str, list[Any]], **kwargs: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, **kwargs)


def _csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)


def _expect_error(source: Any, *match: str, **kwargs: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        list(iter_prompts(source, **kwargs))
    text = str(info.value)
    assert info.value.field in ("prompts", "fmt") and text.startswith(f"{info.value.field}: ")
    for m in match:
        assert m in text, text
    assert len(text) < 400
    return info.value


# --------------------------------------------------------------------------- round trips


def test_list_of_prompts_round_trips_including_empty_prompt() -> None:
    assert list(iter_prompts([*PROMPTS, ""])) == [*PROMPTS, ""]


def test_generator_source_is_consumed_lazily() -> None:
    seen: list[int] = []

    def gen():  # noqa: ANN202
        for i in range(3):
            seen.append(i)
            yield f"p{i}"

    it = iter_prompts(gen())
    assert next(it) == "p0" and seen == [0]


def test_text_file_round_trips_non_ascii_prompts(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    assert list(iter_prompts(path)) == PROMPTS
    assert list(iter_prompts(str(path))) == PROMPTS


def test_text_file_strips_only_line_endings_skips_blank_lines_and_drops_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\r\n\n   \n  indented  \nlast-no-newline")
    assert list(iter_prompts(path)) == ["first", "  indented  ", "last-no-newline"]


def test_jsonl_round_trips_with_default_and_named_field(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": p, "text": p.upper(), "id": i}, ensure_ascii=i % 2 == 0)
             for i, p in enumerate(PROMPTS)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    assert list(iter_prompts(path)) == PROMPTS
    assert list(iter_prompts(path, column="text")) == [p.upper() for p in PROMPTS]


def test_csv_round_trips_quotes_commas_and_embedded_newlines(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    prompts = [*PROMPTS, "two\nlines", ""]
    _csv(path, [["id", "caption"], *[[str(i), p] for i, p in enumerate(prompts)]])
    assert list(iter_prompts(path, column="caption")) == prompts


def test_parquet_round_trips_in_record_batches(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    prompts = [f"#{i} {p}"[:MAX_PROMPT_CHARS] for i in range(3) for p in PROMPTS] * 700  # > 1 batch
    _write_parquet(path, {"prompt": prompts, "n": list(range(len(prompts)))}, row_group_size=1000)
    assert list(iter_prompts(path)) == prompts


def test_format_can_be_forced_regardless_of_suffix(tmp_path: Path) -> None:
    path = tmp_path / "prompts.data"
    path.write_text('{"prompt": "a 7"}\n', encoding="utf-8")
    assert list(iter_prompts(path, fmt="jsonl")) == ["a 7"]


# --------------------------------------------------------------------------- bad inputs


def test_invalid_utf8_is_reported_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"ok\n\nfine\nbad \xff\xfe byte\n")
    _expect_error(path, "line 4", "invalid UTF-8 at byte 4")


def test_invalid_utf8_in_csv_is_reported_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(b"prompt\nok\n\xc3(\n")
    _expect_error(path, "line 3", "invalid UTF-8")


@pytest.mark.parametrize("content", [b"", b"\n\n\n", b"   \n\t\n  \r\n"], ids=["empty", "newlines", "whitespace"])
def test_empty_and_whitespace_only_prompt_files_are_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(content)
    _expect_error(path, "no prompts in 'p.txt'")


def test_empty_list_is_rejected() -> None:
    _expect_error([], "no prompts given")


def test_one_megabyte_prompt_line_is_rejected_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"ok\n" + b"x" * 1_000_000 + b"\n")
    _expect_error(path, "line 2", "longer than 8,000 bytes")


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_one_megabyte_prompt_in_a_record_is_rejected(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"p.{suffix}"
    big = "y" * 1_000_000
    if suffix == "jsonl":
        path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": big}) + "\n")
        _expect_error(path, "line 2", "1,000,000 characters long")
    else:
        _csv(path, [["prompt"], ["ok"], [big]])
        _expect_error(path, "line 3", "longer than")


def test_one_megabyte_prompt_in_a_list_is_rejected_by_index() -> None:
    _expect_error(["ok", "z" * 1_000_000], "index 1", "1,000,000 characters long")


def test_prompt_ending_in_nul_is_rejected_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a handwritten 7\u0000"}) + "\n")
    _expect_error(path, "line 1", "U+0000", "control character")


def test_lone_surrogate_from_json_escape_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a \\ud800 b"}\n')
    _expect_error(path, "line 1", "lone surrogate")


@pytest.mark.parametrize(("line", "why"), [
    ('{"text": "a"}', "missing field 'prompt'"),
    ('{"prompt": 7}', "must be a string, got int"),
    ('{"prompt": null}', "must be a string, got null"),
    ('["a"]', "expected a JSON object"),
    ('{"prompt": "a"', "invalid JSON"),
])
def test_bad_jsonl_records_name_the_line_and_the_problem(tmp_path: Path, line: str, why: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n\n' + line + "\n")
    _expect_error(path, "line 3", why)


def test_csv_without_the_column_names_the_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    _csv(path, [["id", "text"], ["1", "a"]])
    _expect_error(path, "missing column 'prompt'", "'id', 'text'")


def test_csv_row_without_a_value_for_the_column_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("id,prompt\n1,a\n2\n")
    _expect_error(path, "line 3", "no value for column 'prompt'")


def test_parquet_missing_column_non_string_column_and_nulls_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    _write_parquet(path, {"caption": ["a", None], "n": [1, 2]})
    _expect_error(path, "missing column 'prompt'", "'caption'")
    _expect_error(path, "column 'n' has type int64", column="n")
    _expect_error(path, "row 2", "null", column="caption")


def test_file_that_is_not_parquet_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    path.write_bytes(b"not a parquet file at all")
    _expect_error(path, "not a readable Parquet file")


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"fmt": "xlsx"}, "unknown format 'xlsx'"),
    ({"column": "prompt"}, "column applies to jsonl, csv and parquet"),
])
def test_bad_reader_options_are_rejected_at_call_time(tmp_path: Path, kwargs: dict[str, Any],
                                                      why: str) -> None:
    path = tmp_path / "p.txt"
    path.write_text("a\n")
    with pytest.raises(ValidationError, match=why):
        iter_prompts(path, **kwargs)  # no iteration needed


def test_unknown_suffix_and_missing_file_are_rejected_at_call_time(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot tell the format of 'p.xlsx'"):
        iter_prompts(tmp_path / "p.xlsx")
    with pytest.raises(ValidationError, match="file not found"):
        iter_prompts(tmp_path / "missing.txt")


@pytest.mark.parametrize("source", [b"a\nb", 42, None])
def test_sources_that_are_neither_paths_nor_iterables_of_str_are_rejected(source: Any) -> None:
    with pytest.raises(ValidationError, match="file path or an iterable of str"):
        iter_prompts(source)


def test_non_string_items_in_a_list_are_rejected_by_index() -> None:
    _expect_error(["ok", b"bytes"], "index 1", "must be a str, got bytes")


# --------------------------------------------------------------------------- streaming


def test_100k_line_file_streams_with_memory_far_below_the_file_size(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(100_000):
            f.write(f"a handwritten digit number {i:06d} in the style of sample ß-{i}\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        count = chunks = 0
        for chunk in chunk_prompts(iter_prompts(path), 1000):
            chunks += 1
            count += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (count, chunks) == (100_000, 100)
    assert size > 6_000_000
    assert peak < size / 20, f"peak {peak:,} B for a {size:,} B file"


# --------------------------------------------------------------------------- chunks


def test_chunk_prompts_cuts_a_stream_into_lists_with_a_short_last_one() -> None:
    assert list(chunk_prompts(iter(["a", "b", "c", "d", "e"]), 2)) == [["a", "b"], ["c", "d"], ["e"]]
    with pytest.raises(ValidationError, match="prompt_chunk_size"):
        list(chunk_prompts(["a"], 0))


def test_prompt_chunk_encoding_is_deterministic_utf8_json_that_round_trips() -> None:
    chunk = [*PROMPTS, "", "new\nline"]
    data = encode_prompt_chunk(chunk)
    assert data == encode_prompt_chunk(list(chunk))
    assert "七".encode() in data  # stored as UTF-8, not \u escapes
    assert decode_prompt_chunk(data) == chunk
    assert json.loads(data.decode("utf-8")) == chunk


@pytest.mark.parametrize("data", [b"\xff", b"{", b'{"a": 1}', b"[]", b"[1]", b'["\\u0000"]'])
def test_corrupt_prompt_chunks_are_refused(data: bytes) -> None:
    with pytest.raises(ValidationError) as info:
        decode_prompt_chunk(data)
    assert info.value.field == "prompt_chunk"


def test_prompt_chunk_keys_sort_in_chunk_order() -> None:
    assert prompt_chunk_key(42) == "prompts/000000042.json"
    assert sorted(prompt_chunk_key(i) for i in (10, 9, 100)) == [prompt_chunk_key(i) for i in (9, 10, 100)]
    with pytest.raises(ValidationError):
        prompt_chunk_key(-1)


@pytest.mark.parametrize(("start", "stop", "ipp", "size", "chunks"), [
    (0, 10, 1, 10, [0]), (0, 11, 1, 10, [0, 1]), (5, 5, 1, 10, []), (38, 42, 4, 10, [0, 1]),
    (40, 80, 4, 10, [1]), (999, 1001, 1, 1000, [0, 1]),
])
def test_prompt_chunks_for_items_covers_exactly_the_prompts_a_shard_needs(
        start: int, stop: int, ipp: int, size: int, chunks: list[int]) -> None:
    got = prompt_chunks_for_items(start, stop, ipp, size)
    assert list(got) == chunks
    needed = {item_to_prompt_index(i, ipp) // size for i in range(start, stop)}
    assert set(got) == needed


def test_worker_reads_its_shard_prompts_from_only_the_chunks_it_needs() -> None:
    prompts = [f"prompt {i}" for i in range(25)]
    store = {prompt_chunk_key(i): encode_prompt_chunk(c) for i, c in enumerate(chunk_prompts(prompts, 10))}
    ipp, start, stop = 3, 28, 50  # items 28..49 -> prompts 9..16
    loaded: dict[int, list[str]] = {c: decode_prompt_chunk(store[prompt_chunk_key(c)])
                                    for c in prompt_chunks_for_items(start, stop, ipp, 10)}
    assert sorted(loaded) == [0, 1]
    for item in range(start, stop):
        p = item_to_prompt_index(item, ipp)
        assert loaded[p // 10][p % 10] == prompts[p]
