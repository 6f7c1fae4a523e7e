"""The quality filter's rule and seeds (genimg.keepif, JobSpec.keep_if/regenerate, genimg.seeds.attempt_seed),
and its refusal at submit: nothing stored or enqueued, CLI exit 2 (real Redis and S3)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from genimg.errors import ValidationError
from genimg.keepif import MAX_REGENERATE, KeepIf, parse_keep_if
from genimg.profiles import load_profiles
from genimg.profiles.registry import Profiles
from genimg.profiles.schema import ModelProfile
from genimg.seeds import attempt_seed, attempt_seeds, item_seed, item_seeds
from genimg.settings import SpecSettings
from genimg.spec import JobSpec
from tests.fixtures.producer import ProducerEnv

NOISE: dict[str, Any] = {"model": "noise2img", "count": 10, "output": "s3://genimg-test/keep", "seed": 7}


def make(**overrides: Any) -> JobSpec:
    return JobSpec.create(settings=SpecSettings(), **{**NOISE, **overrides})


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(("text", "canonical", "rule"), [
    ("score >= 0.9", "score >= 0.9", KeepIf("score", ">=", 0.9)),
    ("score>=.9", "score >= 0.9", KeepIf("score", ">=", 0.9)),
    ("  label == 7 ", "label == 7", KeepIf("label", "==", 7)),
    ("score < 1e-3", "score < 0.001", KeepIf("score", "<", 0.001)),
    ("label != -1", "label != -1", KeepIf("label", "!=", -1)),
    ("score > +0.5", "score > 0.5", KeepIf("score", ">", 0.5)),
    ("score <= 1", "score <= 1", KeepIf("score", "<=", 1)),
])
def test_keep_if_is_parsed_and_stored_in_canonical_form(text: str, canonical: str, rule: KeepIf) -> None:
    assert parse_keep_if(text) == rule and str(rule) == canonical
    spec = make(keep_if=text, regenerate=3)
    assert spec.keep_if == canonical and spec.keep_rule == rule and spec.regenerate == 3
    again = JobSpec.from_json(spec.to_json(), settings=SpecSettings())
    assert again == spec and json.loads(spec.to_json())["keep_if"] == canonical


def test_a_rule_passes_on_its_column_and_never_on_a_null_or_missing_value() -> None:
    rule = parse_keep_if("score >= 0.9")
    assert rule.passes({"score": 0.9}) and rule.passes({"score": 1.0, "label": 3})
    assert not rule.passes({"score": 0.8999999}) and not rule.passes({"score": None}) and not rule.passes({})
    assert not rule.passes({"score": float("nan")}) and not rule.passes({"score": True})
    assert parse_keep_if("label != 1").passes({"label": 7}) and not parse_keep_if("label == 1").passes({"label": 7})


def test_keep_if_adds_the_tries_column_and_a_job_without_it_stores_the_same_json_as_before() -> None:
    assert make(keep_if="score >= 0.9").metadata_columns == {"label": "int", "score": "float", "tries": "int"}
    plain = make()
    assert plain.metadata_columns == {"label": "int", "score": "float"}
    doc = json.loads(plain.to_json())
    assert "keep_if" not in doc and "regenerate" not in doc  # the bytes a job.json had before the filter
    assert JobSpec.from_json(plain.to_json(), settings=SpecSettings()) == plain
    assert (plain.keep_if, plain.regenerate, plain.keep_rule) == (None, 0, None)
    assert json.loads(make(keep_if="score > 0.5").to_json())["regenerate"] == 0


def _profiles_with_a_text_column() -> Profiles:
    base = load_profiles().get("noise2img").model_dump(mode="json")
    base["name"] = "digits_named"
    base.pop("without_upscale", None)
    base["metadata"]["digit_name"] = {"tensor": "NAME", "type": "str", "dtype": "BYTES"}
    base["metadata"]["readable"] = {"tensor": "READABLE", "type": "bool", "dtype": "BOOL"}
    named = ModelProfile.model_validate(base)
    return Profiles(directory=load_profiles().directory, profiles={**load_profiles().profiles, "digits_named": named})


BAD_FILTERS: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown column", {"keep_if": "quality >= 0.9"}, "keep_if", "does not declare"),
    ("column of the index, not the profile", {"keep_if": "seed > 5"}, "keep_if", "does not declare"),
    ("upper-case column", {"keep_if": "Score >= 0.9"}, "keep_if", "must read"),
    ("operator =>", {"keep_if": "score => 0.9"}, "keep_if", "must read"),
    ("operator =", {"keep_if": "score = 0.9"}, "keep_if", "must read"),
    ("operator missing", {"keep_if": "score 0.9"}, "keep_if", "must read"),
    ("number missing", {"keep_if": "score >="}, "keep_if", "must read"),
    ("two conditions", {"keep_if": "score >= 0.9 and label == 1"}, "keep_if", "must read"),
    ("number is a word", {"keep_if": "score >= high"}, "keep_if", "not a decimal number"),
    ("number is nan", {"keep_if": "score >= nan"}, "keep_if", "not a decimal number"),
    ("number is inf", {"keep_if": "score >= inf"}, "keep_if", "not a decimal number"),
    ("number overflows", {"keep_if": "score >= 1e400"}, "keep_if", "not a finite number"),
    ("number with underscores", {"keep_if": "score >= 1_000"}, "keep_if", "not a decimal number"),
    ("huge integer", {"keep_if": "label == 99999999999999999999"}, "keep_if", "2**53"),
    ("not a string", {"keep_if": 0.9}, "keep_if", "valid string"),
    ("empty", {"keep_if": ""}, "keep_if", "must read"),
    ("too long", {"keep_if": "score >= " + "9" * 200}, "keep_if", "limit is 128"),
    ("regenerate without keep_if", {"regenerate": 4}, "regenerate", "no keep_if"),
    ("regenerate negative", {"keep_if": "score >= 0.9", "regenerate": -1}, "regenerate", "greater than or equal"),
    ("regenerate over the cap", {"keep_if": "score >= 0.9", "regenerate": MAX_REGENERATE + 1}, "regenerate",
     "less than or equal to 64"),
    ("regenerate boolean", {"keep_if": "score >= 0.9", "regenerate": True}, "regenerate", "boolean"),
    ("regenerate float", {"keep_if": "score >= 0.9", "regenerate": 2.0}, "regenerate", "integer"),
    ("regenerate string", {"keep_if": "score >= 0.9", "regenerate": "4"}, "regenerate", "integer"),
]


@pytest.mark.parametrize(("overrides", "field", "words"), [c[1:] for c in BAD_FILTERS],
                         ids=[c[0] for c in BAD_FILTERS])
def test_each_bad_filter_is_refused_naming_its_field(overrides: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as info:
        make(**overrides)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")
    assert words in str(info.value), str(info.value)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(("column", "kind"), [("digit_name", "str"), ("readable", "bool")])
def test_a_text_or_boolean_column_is_refused_naming_the_numeric_ones(column: str, kind: str) -> None:
    profiles = _profiles_with_a_text_column()
    make_named = {**NOISE, "model": "digits_named"}
    assert JobSpec.create(settings=SpecSettings(), profiles=profiles, keep_if="score > 0.5", **make_named).keep_if
    with pytest.raises(ValidationError) as info:
        JobSpec.create(settings=SpecSettings(), profiles=profiles, keep_if=f"{column} == 1", **make_named)
    assert info.value.field == "keep_if"
    assert f"of type {kind}" in str(info.value) and "label, score" in str(info.value)


def test_a_stored_spec_edited_into_a_bad_filter_is_refused() -> None:
    doc = json.loads(make(keep_if="score >= 0.9", regenerate=2).to_json())
    for change, field in (({"keep_if": "sharpness > 1"}, "keep_if"), ({"regenerate": 1000}, "regenerate"),
                          ({"keep_if": None}, "regenerate")):
        with pytest.raises(ValidationError) as info:
            JobSpec.from_json(json.dumps({**doc, **change}), settings=SpecSettings())
        assert info.value.field == field


# --------------------------------------------------------------------------- seeds


def test_attempt_0_is_the_items_own_seed_and_later_attempts_are_distinct() -> None:
    job_seed = 1234
    for i in (0, 1, 42, 2**32, 10**9 - 1):
        assert attempt_seed(job_seed, i, 0) == item_seed(job_seed, i)
    assert attempt_seed(1234, 42, 0) == 3305811667307235245  # test_seeds pins item_seed(1234, 42)
    assert attempt_seed(1234, 42, 1) == 17562413101406735747  # pinned: a numpy stream change is noticed
    items = range(200)
    seen = [attempt_seeds(job_seed, items, k) for k in range(MAX_REGENERATE + 1)]
    assert seen[0].tolist() == item_seeds(job_seed, items).tolist()
    flat = np.concatenate(seen)
    assert flat.dtype == np.uint64 and len(set(flat.tolist())) == flat.size  # 13,000 seeds, none repeated
    assert attempt_seed(job_seed + 1, 42, 1) != attempt_seed(job_seed, 42, 1)


def test_an_attempt_is_not_a_spawned_child_of_the_items_seed_sequence() -> None:
    words = np.array([1234, 0, 42, 0], dtype=np.uint32)
    children = [int(c.generate_state(1, np.uint64)[0]) for c in np.random.SeedSequence(words).spawn(4)]
    assert not set(children) & {attempt_seed(1234, 42, k) for k in range(5)}


@pytest.mark.parametrize(("args", "field"), [((0, 0, -1), "attempt"), ((0, 0, True), "attempt"),
                                             ((0, 0, 2**32), "attempt"), ((-1, 0, 1), "seed"),
                                             ((0, -1, 1), "item_index")])
def test_attempt_seeds_out_of_range_are_rejected(args: tuple, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        attempt_seed(*args)
    assert info.value.field == field


# --------------------------------------------------------------------------- at submit


SUBMIT_CASES = [
    ("unknown_column", {"keep_if": "sharpness >= 2"}, "keep_if"),
    ("bad_operator", {"keep_if": "score ~ 0.9"}, "keep_if"),
    ("bad_number", {"keep_if": "score >= 0.9.1"}, "keep_if"),
    ("regenerate_without_keep_if", {"regenerate": 3}, "regenerate"),
    ("regenerate_over_cap", {"keep_if": "score >= 0.9", "regenerate": 65}, "regenerate"),
]


@pytest.mark.parametrize(("given", "field"), [c[1:] for c in SUBMIT_CASES], ids=[c[0] for c in SUBMIT_CASES])
def test_a_bad_filter_at_submit_stores_and_enqueues_nothing(shared_producer_env: ProducerEnv, given, field):
    env = shared_producer_env
    with pytest.raises(ValidationError) as info:
        env.client.submit(count=20, output=env.output, **given)
    assert info.value.field == field
    assert env.stored_keys() == [] and env.messages() == [] and env.redis_keys() == []


def test_cli_bad_filter_exits_2_naming_the_field_and_a_good_one_is_stored(shared_producer_env: ProducerEnv):
    from typer.testing import CliRunner

    from producer.cli import app

    env = shared_producer_env
    base = ["submit", "--count", "20", "--output", env.output]
    for extra, field in ((["--keep-if", "score >= lots"], "keep_if"), (["--regenerate", "2"], "regenerate"),
                         (["--keep-if", "label >= 1", "--regenerate", "99"], "regenerate")):
        res = CliRunner().invoke(app, base + extra, env=env.env())
        assert res.exit_code == 2, (res.stdout, res.stderr)
        assert f"invalid {field}:" in res.stderr, res.stderr
    assert env.stored_keys() == [] and env.messages() == []
    res = CliRunner().invoke(app, [*base, "--keep-if", "score>=0.95", "--regenerate", "5", "--json"], env=env.env())
    assert res.exit_code == 0, (res.stdout, res.stderr)
    spec = env.client.load_spec(json.loads(res.stdout)["job_id"])
    assert (spec.keep_if, spec.regenerate) == ("score >= 0.95", 5) and len(env.messages()) == 1


def test_an_idempotency_key_reused_with_another_filter_is_a_conflict_and_without_one_the_same_job(
        shared_producer_env: ProducerEnv):
    from genimg.errors import ConflictError
    from genimg.layout import SPEC_OBJECT

    env = shared_producer_env
    first = env.client.submit(count=20, output=env.output, idempotency_key="plain-20")
    stored = json.loads(env.store.get_bytes(f"runs/{first.job_id}/{SPEC_OBJECT}"))
    assert "keep_if" not in stored and "regenerate" not in stored  # job.json as before the filter existed
    for change in ({"keep_if": "score >= 0.9"}, {"keep_if": "score >= 0.9", "regenerate": 2}):
        with pytest.raises(ConflictError, match="keep_if"):
            env.client.submit(count=20, output=env.output, idempotency_key="plain-20", **change)
    assert env.client.submit(count=20, output=env.output, idempotency_key="plain-20").job_id == first.job_id
    assert len(env.messages()) == 1
    kept = env.client.submit(count=20, output=env.output, idempotency_key="kept-20", keep_if="score>=0.9",
                             regenerate=2)
    assert env.client.submit(count=20, output=env.output, idempotency_key="kept-20", keep_if="score >= 0.90",
                             regenerate=2).job_id == kept.job_id  # the same rule, spelled otherwise
    with pytest.raises(ConflictError, match="regenerate"):
        env.client.submit(count=20, output=env.output, idempotency_key="kept-20", keep_if="score >= 0.9",
                          regenerate=3)


@pytest.mark.parametrize("text", ["score >= ٠.٩", "label == ７", "score\u3000>=\u30000.9", b"score >= 0.9"])
def test_keep_if_takes_only_an_ascii_str(text: Any) -> None:
    """Other scripts' digits and spaces, and bytes, would be stored as a different text than the one given."""
    with pytest.raises(ValidationError) as info:
        make(keep_if=text, regenerate=1)
    assert info.value.field == "keep_if"


@pytest.mark.parametrize(("regenerate", "shard_size"), [(0, 1000), (15, 1000), (16, 963), (43, 372), (64, 252)])
def test_a_keep_if_job_without_shard_size_gets_shards_whose_worst_case_fits(regenerate: int, shard_size: int) -> None:
    from genimg.keepif import MAX_SHARD_TRIES

    spec = make(count=5000, keep_if="score >= 0.9", regenerate=regenerate)
    assert spec.shard_size == shard_size and spec.shard_size * (1 + regenerate) <= MAX_SHARD_TRIES
    assert make(count=5000).shard_size == 1000  # no keep_if: the default stands


def test_a_keep_if_job_whose_shard_could_outlast_the_task_time_limit_is_refused_naming_shard_size() -> None:
    with pytest.raises(ValidationError) as info:  # 2,000 x 65 = 130,000 images in one shard: never finishes
        make(count=2000, shard_size=2000, keep_if="score > 2", regenerate=64)
    assert info.value.field == "shard_size" and "shard_size <= 252" in str(info.value)
    assert make(count=2000, shard_size=252, keep_if="score > 2", regenerate=64).shard_size == 252
