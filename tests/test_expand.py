"""Prompt expansion options and templates (issue 15): syntax, uniform seeded choices, refusals naming the field."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from genimg.errors import ValidationError
from genimg.expand import ShardExpander, parse_template
from genimg.spec import JobSpec
from tests.fixtures.producer import ProducerEnv


def _spec(n: int, seed: int, images_per_prompt: int = 1, **expand) -> JobSpec:
    return JobSpec.create(model="txt2img", num_prompts=n, images_per_prompt=images_per_prompt, seed=seed,
                          output="s3://bucket/x", shard_size=10_000, expand={"model": None, **expand})


def _expand_all(spec: JobSpec, prompts: list[str], wildcards=None) -> list[str]:
    n = spec.total_items
    items = [prompts[i // spec.images_per_prompt] for i in range(n)]
    ex = ShardExpander(spec, np.arange(n, dtype=np.int64), items, None, wildcards or {})
    return [e.revised for e in ex.get(range(n))]


def test_each_of_four_alternatives_takes_a_quarter_of_10000_items_and_the_job_seed_repeats_them():
    texts = _expand_all(_spec(10_000, seed=11, template="{a|b|c|d}"), ["p"] * 10_000)
    shares = {k: v / 10_000 for k, v in Counter(texts).items()}
    assert sorted(shares) == ["a", "b", "c", "d"]
    assert all(abs(s - 0.25) <= 0.02 for s in shares.values()), shares
    assert _expand_all(_spec(10_000, seed=11, template="{a|b|c|d}"), ["p"] * 10_000) == texts
    other = _expand_all(_spec(10_000, seed=12, template="{a|b|c|d}"), ["p"] * 10_000)
    assert other != texts and sum(a == b for a, b in zip(texts, other)) < 3_000  # independent draws agree ~25 %


def test_an_items_expansion_depends_on_its_seed_only_not_on_its_shard():
    spec = _spec(40, seed=5, template="{red|green|blue} {cat|dog} of {prompt}")
    prompts = [f"p{i}" for i in range(40)]
    whole = _expand_all(spec, prompts)
    part = ShardExpander(spec, np.arange(17, 29, dtype=np.int64), prompts[17:29], None, {})
    assert [e.revised for e in part.get(range(12))] == whole[17:29]
    assert all(t.endswith(f" of p{i}") for i, t in enumerate(whole))


def test_images_of_a_prompt_share_its_expansion_unless_per_item():
    shared = _expand_all(_spec(200, seed=1, images_per_prompt=2, template="{a|b|c|d|e|f|g|h}"), ["x"] * 200)
    assert all(shared[2 * k] == shared[2 * k + 1] for k in range(200))
    own = _expand_all(_spec(200, seed=1, images_per_prompt=2, template="{a|b|c|d|e|f|g|h}", per="item"),
                      ["x"] * 200)
    assert sum(own[2 * k] != own[2 * k + 1] for k in range(200)) > 150


def test_groups_nested_32_deep_are_accepted_and_render():
    template = parse_template("{x|" * 32 + "y" + "}" * 32)
    assert template.render("p", 0, {}) in {"x", "y"}


def test_nested_groups_and_wildcards_expand_from_the_stored_options():
    wild = {"mood": ["calm", "stormy"]}
    spec = JobSpec.create(model="txt2img", num_prompts=400, seed=2, output="s3://bucket/x", shard_size=1000,
                          expand={"model": None, "template": "{a {big|small}|the} __mood__ {prompt}",
                                  "wildcards": {"mood": "0" * 64}, "wildcards_sha256": "1" * 64})
    texts = _expand_all(spec, ["sea"] * 400, wild)
    assert set(texts) == {f"{a} {m} sea" for a in ("a big", "a small", "the") for m in ("calm", "stormy")}


@pytest.mark.parametrize(("template", "words"), [
    ("{a|b", "unbalanced '{' at character 0"),
    ("a|b}", "'|' at character 1 is outside"),
    ("ab}", "unbalanced '}' at character 2"),
    ("{solo} cat", "has one alternative"),
    ("{a|{b|c}", "unbalanced '{' at character 0"),
    ("{a|" * 33 + "b" + "}" * 33, "groups nest deeper than 32 levels at character 96"),
    ("{a|" * 485 + "b" + "}" * 485, "groups nest deeper than 32 levels"),  # a RecursionError in workers before
    ("{" * 999 + "}" * 999, "groups nest deeper than 32 levels at character 32"),  # and in the producer
])
def test_malformed_templates_say_what_and_where(template, words):
    with pytest.raises(ValueError, match=None) as info:
        parse_template(template)
    assert words in str(info.value)


BAD_EXPAND = [
    ("negative_tokens", {"max_new_tokens": -4}, "expand.max_new_tokens"),
    ("zero_tokens", {"max_new_tokens": 0}, "expand.max_new_tokens"),
    ("too_many_tokens", {"max_new_tokens": 257}, "expand.max_new_tokens"),
    ("temperature_nan", {"temperature": float("nan")}, "expand.temperature"),
    ("temperature_inf", {"temperature": float("inf")}, "expand.temperature"),
    ("temperature_negative", {"temperature": -0.5}, "expand.temperature"),
    ("unbalanced_braces", {"template": "{red|green {prompt}"}, "expand.template"),
    ("missing_wildcard_file", {"template": "__colour__ {prompt}", "wildcards_dir": "WILD"}, "expand.wildcards_dir"),
    ("wildcard_without_directory", {"template": "__colour__ {prompt}"}, "expand.template"),
    ("wildcards_dir_missing_unused", {"template": "{a|b} {prompt}", "wildcards_dir": "/nonexistent/wild"},
     "expand.wildcards_dir"),
    ("instruction_without_slot", {"instruction": "Describe it."}, "expand.instruction"),
    ("unknown_option", {"top_p": 0.9}, "expand.top_p"),
    ("not_a_mapping", "describe", "expand"),
]


@pytest.mark.parametrize(("given", "field"), [c[1:] for c in BAD_EXPAND], ids=[c[0] for c in BAD_EXPAND])
def test_bad_expand_options_are_refused_naming_the_field_with_nothing_stored(shared_producer_env: ProducerEnv,
                                                                             tmp_path: Path, given, field):
    env = shared_producer_env
    (tmp_path / "wild").mkdir()
    (tmp_path / "wild" / "color.txt").write_text("red\n")  # not "colour"
    if isinstance(given, dict) and given.get("wildcards_dir") == "WILD":
        given = {**given, "wildcards_dir": str(tmp_path / "wild")}
    with pytest.raises(ValidationError) as info:
        env.client.submit(["a cat", "a dog"], output=env.output, expand=given)
    assert info.value.field == field, str(info.value)
    assert env.stored_keys() == [] and env.messages() == [] and env.redis_keys() == []


def test_expand_on_a_noise_profile_is_refused(shared_producer_env: ProducerEnv):
    env = shared_producer_env
    with pytest.raises(ValidationError) as info:
        env.client.submit(model="faces", count=3, output=env.output, expand={"template": "{a|b}"})
    assert info.value.field in ("prompts", "expand")
    assert env.stored_keys() == [] and env.messages() == []


def test_cli_bad_expand_options_exit_2_naming_the_field(shared_producer_env: ProducerEnv, tmp_path: Path):
    from typer.testing import CliRunner

    from producer.cli import app

    env = shared_producer_env
    cases = ((["--expand-max-new-tokens", "-3"], "expand.max_new_tokens"),
             (["--expand-temperature", "nan"], "expand.temperature"),
             (["--expand-template", "{a|b"], "expand.template"),
             (["--expand-template", "__nope__", "--wildcards-dir", str(tmp_path)], "expand.wildcards_dir"))
    for extra, field in cases:
        res = CliRunner().invoke(app, ["submit", "--prompt", "a cat", "--output", env.output, *extra], env=env.env())
        assert res.exit_code == 2, (extra, res.stdout, res.stderr)
        assert f"invalid {field}:" in res.stderr, res.stderr
    assert env.stored_keys() == [] and env.messages() == []


def test_workers_wait_for_the_prompt_expander_unless_told_none(monkeypatch: pytest.MonkeyPatch):
    from workers.app import required_models

    monkeypatch.delenv("GENIMG_TRITON_EXPANDER", raising=False)
    assert "prompt_expander" in required_models()
    monkeypatch.setenv("GENIMG_TRITON_EXPANDER", "")
    assert "prompt_expander" not in required_models()


def test_a_wildcard_file_does_not_rename_the_job(shared_producer_env: ProducerEnv, tmp_path: Path):
    # Field report (new-user walkthrough): a job with wildcards took the last wildcard's name as its own.
    env = shared_producer_env
    (tmp_path / "style.txt").write_text("oil\nwatercolour\n")
    expand = {"template": "__style__ {prompt}", "model": None, "wildcards_dir": str(tmp_path)}
    unnamed = env.client.submit(["a cat"], output=env.output, expand=expand)
    named = env.client.submit(["a cat"], output=env.output, expand=expand, name="run-a")
    assert (unnamed.spec.name, named.spec.name) == (None, "run-a")
