"""JobSpec validation, JSON round trip, prompt limits and the shard plan (genimg.spec)."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from genimg.errors import ValidationError
from genimg.settings import SpecSettings
from genimg.spec import SCHEMA_VERSION, JobSpec, derive_job_id
from genimg.limits import MAX_PROMPT_BYTES, MAX_PROMPT_CHARS, MAX_SHARDS, MAX_TOTAL_ITEMS, prompt_problem, validate_prompt
from genimg.shardplan import item_to_prompt_index, plan_shards
from genimg.urls import validate_output_url

BASE: dict[str, Any] = {"model": "txt2img", "num_prompts": 10, "output": "s3://genimg-test/run-7",
                        "seed": 1234}


@pytest.fixture(autouse=True)
def _no_local_root_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GENIMG_LOCAL_OUTPUT_ROOT", raising=False)


@pytest.fixture()
def settings(tmp_path: Path) -> SpecSettings:
    root = tmp_path / "out"
    root.mkdir()
    return SpecSettings(local_output_root=root)


def make(settings: SpecSettings | None = None, **overrides: Any) -> JobSpec:
    return JobSpec.create(settings=settings or SpecSettings(), **{**BASE, **overrides})


# --------------------------------------------------------------------------- valid specs


def test_txt2img_spec_gets_defaults_a_random_job_id_and_utc_created_at() -> None:
    spec = make()
    assert len(spec.job_id) == 32 and int(spec.job_id, 16) >= 0
    assert spec.created_at.tzinfo is not None and spec.created_at.utcoffset().total_seconds() == 0
    assert (spec.image_format, spec.shard_size, spec.priority, spec.upscale) == ("png", 1000, 5, True)
    assert spec.total_items == 10 and spec.prompt_chunk_size == 1000
    assert make().job_id != spec.job_id


def test_noise2img_spec_counts_items_and_plans_shards() -> None:
    spec = make(model="noise2img", num_prompts=None, count=2_500, shard_size=1_000)
    assert spec.total_items == 2_500 and spec.prompt_chunk_size is None
    assert list(spec.shard_plan()) == [(0, 1000), (1000, 2000), (2000, 2500)]


def test_txt2img_total_items_is_prompts_times_images_per_prompt() -> None:
    assert make(num_prompts=200_000, images_per_prompt=4).total_items == 800_000


def test_same_idempotency_key_derives_the_same_short_job_id() -> None:
    a = make(idempotency_key="run-7/2026-01-01")
    b = make(idempotency_key="run-7/2026-01-01", seed=99)
    assert a.job_id == b.job_id == derive_job_id("run-7/2026-01-01")
    assert len(a.job_id) == 32
    assert make(idempotency_key="run-8").job_id != a.job_id


def test_spec_round_trips_through_json_with_schema_version() -> None:
    spec = make(name="mnist-7s", idempotency_key="k1", priority="high", image_format="webp",
                quality=80, upscale=False)
    text = spec.to_json()
    assert json.loads(text)["schema_version"] == SCHEMA_VERSION
    assert "prompts" not in json.loads(text)  # the prompt list is never in the spec
    again = JobSpec.from_json(text, settings=SpecSettings())
    assert again == spec and again.to_json() == text
    assert JobSpec.from_json(text.encode("utf-8"), settings=SpecSettings()) == spec


def test_dedup_is_stored_only_when_set_so_older_specs_keep_their_bytes() -> None:
    spec = make(model="noise2img", num_prompts=None, count=10)
    text = spec.to_json()
    assert spec.dedup is None and "dedup" not in json.loads(text)
    assert JobSpec.from_json(text, settings=SpecSettings()).to_json() == text
    near = make(model="noise2img", num_prompts=None, count=10, dedup="near")
    assert json.loads(near.to_json())["dedup"] == "near"
    assert JobSpec.from_json(near.to_json(), settings=SpecSettings()).dedup == "near"
    with pytest.raises(ValidationError) as e:
        make(model="noise2img", num_prompts=None, count=10, dedup="fuzzy")
    assert e.value.field == "dedup" and "'exact' or 'near'" in str(e.value)


@pytest.mark.parametrize(("given", "stored"), [("low", 0), ("normal", 5), ("HIGH", 9), (3, 3),
                                               (np.int64(7), 7)])
def test_priority_accepts_names_and_integers_and_stores_the_integer(given: Any, stored: int) -> None:
    assert make(priority=given).priority == stored


def test_numpy_integers_are_accepted_as_counts_and_seeds() -> None:
    spec = make(num_prompts=np.int32(5), seed=np.uint64(2**63 - 1))
    assert spec.num_prompts == 5 and spec.seed == 2**63 - 1 and type(spec.seed) is int


def test_s3_output_is_normalised_without_trailing_slash() -> None:
    assert make(output="s3://genimg-test/run-7/").output == "s3://genimg-test/run-7"
    assert make(output="s3://genimg-test").job_prefix.startswith("s3://genimg-test/")
    spec = make(output="s3://genimg-test/a/date=2026-01-01")
    assert spec.prompts_url == f"s3://genimg-test/a/date=2026-01-01/{spec.job_id}/prompts"


def test_file_output_inside_allowed_root_is_accepted_as_resolved_path(settings: SpecSettings) -> None:
    root = settings.local_output_root
    assert root is not None
    spec = make(settings, output=f"file://{root}/run-7")
    assert spec.output == f"file://{root.resolve()}/run-7"


def test_file_output_root_comes_from_genimg_local_output_root(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GENIMG_LOCAL_OUTPUT_ROOT", str(tmp_path))
    assert JobSpec.create(**{**BASE, "output": f"file://{tmp_path}/x"}).output.endswith("/x")


def test_file_output_escaping_the_root_through_a_symlink_is_rejected(settings: SpecSettings,
                                                                      tmp_path: Path) -> None:
    root = settings.local_output_root
    assert root is not None
    os.symlink(tmp_path, root / "escape")
    with pytest.raises(ValidationError, match="inside the allowed root") as info:
        make(settings, output=f"file://{root}/escape/x")
    assert info.value.field == "output"


def test_file_output_is_rejected_when_no_local_root_is_configured(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="GENIMG_LOCAL_OUTPUT_ROOT") as info:
        make(output=f"file://{tmp_path}/x")
    assert info.value.field == "output"


def test_direct_construction_validates_the_same_rules() -> None:
    with pytest.raises(ValueError, match="seed"):
        JobSpec(**{**BASE, "job_id": "0" * 32, "created_at": datetime.now(timezone.utc), "seed": -5})


# --------------------------------------------------------------------------- bad inputs

NOISE = {"model": "noise2img", "num_prompts": None}

BAD_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("count zero", {**NOISE, "count": 0}, "count"),
    ("count negative", {**NOISE, "count": -1}, "count"),
    ("count huge", {**NOISE, "count": MAX_TOTAL_ITEMS + 1}, "count"),
    ("count boolean", {**NOISE, "count": True}, "count"),
    ("count float", {**NOISE, "count": 1.5}, "count"),
    ("count string", {**NOISE, "count": "100"}, "count"),
    ("count missing for noise2img", {**NOISE}, "count"),
    ("count given to txt2img", {"count": 5}, "count"),
    ("num_prompts zero", {"num_prompts": 0}, "num_prompts"),
    ("num_prompts negative", {"num_prompts": -3}, "num_prompts"),
    ("num_prompts huge", {"num_prompts": 10**12}, "num_prompts"),
    ("total items over limit", {"num_prompts": 10**8, "images_per_prompt": 64}, "num_prompts"),
    ("num_prompts missing for txt2img", {"num_prompts": None}, "num_prompts"),
    ("num_prompts given to noise2img", {**NOISE, "count": 5, "num_prompts": 5}, "num_prompts"),
    ("images_per_prompt zero", {"images_per_prompt": 0}, "images_per_prompt"),
    ("images_per_prompt over 64", {"images_per_prompt": 65}, "images_per_prompt"),
    ("images_per_prompt for noise2img", {**NOISE, "count": 5, "images_per_prompt": 2},
     "images_per_prompt"),
    ("seed negative", {"seed": -1}, "seed"),
    ("seed 2**63", {"seed": 2**63}, "seed"),
    ("seed 2**64", {"seed": 2**64}, "seed"),
    ("seed string", {"seed": "12"}, "seed"),
    ("unknown model", {"model": "sdxl"}, "model"),
    ("model wrong case", {"model": "TXT2IMG"}, "model"),
    ("unknown image format", {"image_format": "gif"}, "image_format"),
    ("image format wrong case", {"image_format": "PNG"}, "image_format"),
    ("quality zero", {"quality": 0}, "quality"),
    ("quality over 100", {"quality": 101}, "quality"),
    ("shard_size zero", {"shard_size": 0}, "shard_size"),
    ("shard_size over 10000", {"shard_size": 10_001}, "shard_size"),
    ("too many shards", {**NOISE, "count": MAX_SHARDS + 1, "shard_size": 1}, "shard_size"),
    ("sub_batch_size zero", {"sub_batch_size": 0}, "sub_batch_size"),
    ("sub_batch_size over 256", {"sub_batch_size": 257}, "sub_batch_size"),
    ("prompt_chunk_size over limit", {"prompt_chunk_size": 10_001}, "prompt_chunk_size"),
    ("upscale string", {"upscale": "yes"}, "upscale"),
    ("priority 10", {"priority": 10}, "priority"),
    ("priority negative", {"priority": -1}, "priority"),
    ("priority unknown name", {"priority": "urgent"}, "priority"),
    ("name with space", {"name": "my job"}, "name"),
    ("name with path", {"name": "../etc"}, "name"),
    ("name too long", {"name": "n" * 65}, "name"),
    ("idempotency key empty", {"idempotency_key": ""}, "idempotency_key"),
    ("idempotency key with space", {"idempotency_key": "a b"}, "idempotency_key"),
    ("idempotency key too long", {"idempotency_key": "k" * 257}, "idempotency_key"),
    ("job_id not hex", {"job_id": "not-a-job-id"}, "job_id"),
    ("job_id not matching idempotency key", {"job_id": "0" * 32, "idempotency_key": "k"}, "job_id"),
    ("created_at naive", {"created_at": datetime(2026, 1, 1)}, "created_at"),
    ("prompt list inside the spec", {"prompts": ["a cat"]}, "prompts"),
    ("output with ..", {"output": "s3://genimg-test/a/../b"}, "output"),
    ("output with .. inside a segment", {"output": "s3://genimg-test/a..b"}, "output"),
    ("output with empty segment", {"output": "s3://genimg-test/a//b"}, "output"),
    ("output with dot segment", {"output": "s3://genimg-test/./b"}, "output"),
    ("output with backslash", {"output": "s3://genimg-test/a\\b"}, "output"),
    ("output with NUL", {"output": "s3://genimg-test/a\x00b"}, "output"),
    ("output with newline", {"output": "s3://genimg-test/a\nb"}, "output"),
    ("output with space", {"output": "s3://genimg-test/a b"}, "output"),
    ("output percent-encoded dots", {"output": "s3://genimg-test/%2e%2e/x"}, "output"),
    ("output uppercase bucket", {"output": "s3://Genimg-Test/x"}, "output"),
    ("output bucket too short", {"output": "s3://ab/x"}, "output"),
    ("output bucket is an IP", {"output": "s3://192.168.1.10/x"}, "output"),
    ("output bucket reserved prefix", {"output": "s3://xn--genimg/x"}, "output"),
    ("output no bucket", {"output": "s3:///x"}, "output"),
    ("output too long", {"output": "s3://genimg-test/" + "a" * 600}, "output"),
    ("output http scheme", {"output": "http://example.com/x"}, "output"),
    ("output https scheme", {"output": "https://s3.amazonaws.com/b/x"}, "output"),
    ("output ftp scheme", {"output": "ftp://host/x"}, "output"),
    ("output uppercase S3 scheme", {"output": "S3://genimg-test/x"}, "output"),
    ("output relative path", {"output": "out/run-7"}, "output"),
    ("output absolute path without scheme", {"output": "/tmp/run-7"}, "output"),
    ("output file outside root", {"output": "file:///etc/genimg"}, "output"),
    ("output file with ..", {"output": "file:///tmp/out/../../etc"}, "output"),
    ("output file with host", {"output": "file://host/tmp/x"}, "output"),
    ("output not a string", {"output": 7}, "output"),
]


@pytest.mark.parametrize(("overrides", "field"), [c[1:] for c in BAD_SPECS],
                         ids=[c[0] for c in BAD_SPECS])
def test_every_bound_is_rejected_with_one_error_naming_the_field(
        settings: SpecSettings, overrides: dict[str, Any], field: str) -> None:
    fields = {**BASE, **overrides}
    fields = {k: v for k, v in fields.items() if v is not None}
    with pytest.raises(ValidationError) as info:
        JobSpec.create(settings=settings, **fields)
    err = info.value
    assert err.field == field
    assert str(err).startswith(f"{field}: ")
    assert len(str(err)) < 400  # readable, and never echoes a huge input


def test_more_than_25_bad_spec_inputs_are_covered() -> None:
    assert len(BAD_SPECS) >= 25


def test_error_message_says_what_is_wrong_and_what_was_given() -> None:
    with pytest.raises(ValidationError) as info:
        make(images_per_prompt=65)
    assert str(info.value) == "images_per_prompt: input should be less than or equal to 64 (got 65)"
    with pytest.raises(ValidationError, match=r"^output: unsupported scheme 'http'"):
        make(output="http://example.com/x")


def test_a_spec_with_several_errors_reports_the_first_field_and_counts_the_rest() -> None:
    with pytest.raises(ValidationError) as info:
        make(images_per_prompt=0, seed=-1, quality=0)
    assert info.value.field == "images_per_prompt"
    assert "[2 more errors]" in str(info.value)


# --------------------------------------------------------------------------- stored spec edited


def _edited(change: dict[str, Any] | None = None, drop: str | None = None) -> str:
    doc = json.loads(make(idempotency_key="run-7").to_json())
    doc.update(change or {})
    if drop:
        del doc[drop]
    return json.dumps(doc)


EDITED_SPECS: list[tuple[str, str | bytes, str]] = [
    ("seed made negative", _edited({"seed": -1}), "seed"),
    ("model renamed", _edited({"model": "img2img"}), "model"),
    ("images_per_prompt raised", _edited({"images_per_prompt": 1000}), "images_per_prompt"),
    ("job_id changed under an idempotency key", _edited({"job_id": "f" * 32}), "job_id"),
    ("job_id removed", _edited(drop="job_id"), "job_id"),
    ("created_at removed", _edited(drop="created_at"), "created_at"),
    ("unknown field added", _edited({"pickle": "gASV"}), "pickle"),
    ("newer schema version", _edited({"schema_version": 3}), "schema_version"),
    ("output redirected to http", _edited({"output": "http://evil.example/x"}), "output"),
    ("count added to txt2img", _edited({"count": 5}), "count"),
    ("not JSON", "{not json", "spec"),
    ("a JSON list", "[1, 2]", "spec"),
    ("invalid UTF-8", b'{"seed": "\xff"}', "spec"),
    ("huge document", _edited({"name": "x" * 300_000}), "spec"),
]


@pytest.mark.parametrize(("text", "field"), [c[1:] for c in EDITED_SPECS],
                         ids=[c[0] for c in EDITED_SPECS])
def test_stored_spec_edited_into_something_invalid_is_refused(text: str | bytes, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.from_json(text, settings=SpecSettings())
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


# --------------------------------------------------------------------------- output URL helper


@pytest.mark.parametrize("url", ["s3://genimg-test", "s3://a.b-c/x/y/z", "s3://genimg-test/k=v,w@1+2"])
def test_valid_s3_urls_pass_unchanged(url: str) -> None:
    assert validate_output_url(url, local_output_root=None) == url


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("prompt", ["", "   ", "a handwritten 7", "Ziffer sieben – 七 – 🔢",
                                    "tab\tand\nnewline\r", "x" * MAX_PROMPT_CHARS,
                                    "😀" * MAX_PROMPT_CHARS])
def test_acceptable_prompts_pass_unchanged(prompt: str) -> None:
    assert validate_prompt(prompt) is prompt


def test_a_2000_character_4_byte_prompt_is_exactly_at_the_byte_limit() -> None:
    assert len(("😀" * MAX_PROMPT_CHARS).encode("utf-8")) == MAX_PROMPT_BYTES


BAD_PROMPTS = [
    ("one megabyte", "x" * 1_000_000, "1,000,000 characters long"),
    ("2001 characters", "x" * (MAX_PROMPT_CHARS + 1), "2,001 characters long"),
    ("ending in NUL", "a handwritten 7\x00", "U+0000"),
    ("NUL inside", "a\x00b", "U+0000 at character 1"),
    ("escape character", "a\x1b[31m", "U+001B"),
    ("DEL", "a\x7f", "U+007F"),
    ("C1 control", "a\x85", "U+0085"),
    ("lone surrogate", "a\ud800b", "lone surrogate U+D800"),
    ("bytes", b"a handwritten 7", "must be a str, got bytes"),
    ("None", None, "must be a str, got NoneType"),
]


@pytest.mark.parametrize(("prompt", "why"), [c[1:] for c in BAD_PROMPTS], ids=[c[0] for c in BAD_PROMPTS])
def test_bad_prompts_are_rejected_with_the_rule_they_break(prompt: Any, why: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_prompt(prompt)
    assert info.value.field == "prompt"
    assert why in str(info.value) and str(info.value).startswith("prompt: ")
    assert len(str(info.value)) < 300
    assert prompt_problem(prompt) is not None


def test_one_megabyte_prompt_is_refused_without_scanning_it() -> None:
    prompt = "\x00" * 1_000_000
    t0 = time.perf_counter()
    assert "1,000,000 characters" in (prompt_problem(prompt) or "")
    assert time.perf_counter() - t0 < 0.01


# --------------------------------------------------------------------------- shard plan


@pytest.mark.parametrize(("total", "size"), [(1, 1), (10, 3), (10, 10), (10, 11), (9_999, 1000)])
def test_shard_ranges_cover_every_item_exactly_once_in_order(total: int, size: int) -> None:
    plan = plan_shards(total, size)
    ranges = [plan.shard_range(i) for i in range(plan.num_shards)]
    assert ranges == list(plan)
    assert [i for a, b in ranges for i in range(a, b)] == list(range(total))
    assert all(0 < b - a <= size for a, b in ranges)
    assert all(plan.shard_of_item(i) == k for k, (a, b) in enumerate(ranges) for i in range(a, b))


def test_planning_a_billion_items_is_constant_time_and_memory() -> None:
    t0 = time.perf_counter()
    plan = plan_shards(MAX_TOTAL_ITEMS, 1000)
    assert plan.num_shards == 1_000_000 and len(plan) == 1_000_000
    assert plan.shard_range(999_999) == (999_999_000, 1_000_000_000)
    assert time.perf_counter() - t0 < 0.01


@pytest.mark.parametrize(("total", "size", "field"), [
    (0, 10, "total_items"), (-1, 10, "total_items"), (MAX_TOTAL_ITEMS + 1, 10, "total_items"),
    (10, 0, "shard_size"), (10, 10_001, "shard_size"), (10, True, "shard_size"), (10.0, 5, "total_items"),
])
def test_plan_shards_rejects_out_of_range_arguments(total: Any, size: Any, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        plan_shards(total, size)
    assert info.value.field == field


@pytest.mark.parametrize("index", [-1, 4, True, 1.0])
def test_shard_range_rejects_indices_outside_the_plan(index: Any) -> None:
    with pytest.raises(ValidationError) as info:
        plan_shards(10, 3).shard_range(index)
    assert info.value.field == "shard_index"


def test_items_map_to_prompts_prompt_major() -> None:
    assert [item_to_prompt_index(i, 4) for i in range(9)] == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert item_to_prompt_index(41, 1) == 41
    with pytest.raises(ValidationError, match="images_per_prompt"):
        item_to_prompt_index(1, 0)
