"""Prompt expansion end to end (issue 15): SmolLM2 on the real Triton, jobs through real Redis, S3 and workers."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from genimg.shards import read_shard_index
from genimg.layout import Layout
from genimg.contract import EXPANDER

pytestmark = pytest.mark.slow

TOPICS = ["a lighthouse", "a red fox", "an old tram", "a bowl of ramen", "a paper boat", "a snowy village",
          "a robot gardener", "a desert cactus", "a jazz trio", "a rainy street"]
SOURCES = [f"{t} #{k}" for k in range(10) for t in TOPICS]
"""100 distinct short source texts."""
TIMINGS = ["infer_s", "encode_s"]
"""Index columns that differ between two runs of a shard: its timings."""


def _expand(client, texts: list[str], seeds: list[int], max_new_tokens: int = 24, temperature: float = 0.7,
            instruction: str = "Describe a picture of {text} in one short sentence."):
    n = len(texts)
    return client.infer(EXPANDER.name, {
        "TEXT": texts, "INSTRUCTION": [instruction] * n, "SEED": np.array(seeds, dtype=np.uint64).reshape(n, 1),
        "MAX_NEW_TOKENS": np.full((n, 1), max_new_tokens, dtype=np.int32),
        "TEMPERATURE": np.full((n, 1), temperature, dtype=np.float32)})


def test_the_expander_writes_a_description_the_same_for_the_same_text_seed_and_settings(expander_served):
    triton_server = expander_served
    from genimg.triton.client import InferenceClient

    with InferenceClient(triton_server.urls["grpc"], "grpc", timeout_s=120) as c:
        texts = ["a lighthouse at night", "a red fox in the snow", "a lighthouse at night"]
        t0 = time.perf_counter()
        first = _expand(c, texts, [7, 7, 8])
        seconds = time.perf_counter() - t0
        again = _expand(c, texts[:2], [7, 7])
        greedy = _expand(c, texts[:1], [1], temperature=0.0)
        greedy2 = _expand(c, texts[:1], [2], temperature=0.0)
    words = [bytes(b).decode() for b in first["DESCRIPTION"].reshape(-1)]
    tokens = first["TOKENS"].reshape(-1).tolist()
    print(f"expander: {sum(tokens)} tokens for 3 texts in {seconds:.2f} s ({sum(tokens) / seconds:.1f} tok/s): "
          f"{words}")
    assert all(w.strip() and w != t for w, t in zip(words, texts)) and all(0 < k <= 24 for k in tokens)
    assert [bytes(b).decode() for b in again["DESCRIPTION"].reshape(-1)] == words[:2]  # same request, same text
    assert words[2] != words[0]  # another seed samples another description
    assert greedy["DESCRIPTION"][0, 0] == greedy2["DESCRIPTION"][0, 0]  # temperature 0 ignores the seed


def _tar(store, layout: Layout, shard: int) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(store.get_bytes(layout.tar_key(shard)))) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_a_job_of_100_texts_x_2_images_is_described_by_the_lm_and_a_rerun_shard_is_identical(
        stack, s3_bucket, expander_served, tmp_path: Path):
    triton_server = expander_served
    from genimg.pipeline import Infer, run_shard
    from genimg.triton.client import InferenceClient
    from producer import Client

    wild = tmp_path / "wildcards"
    wild.mkdir()
    (wild / "style.txt").write_text("# styles\nwatercolour\n\nink drawing\n")
    worker = stack.start_worker(GENIMG_CONCURRENCY=1)
    worker.wait_ready()
    t0 = time.perf_counter()
    with Client() as client:
        job = client.submit(SOURCES, images_per_prompt=2, output=f"s3://{s3_bucket}/expand", seed=42, shard_size=50,
                            expand={"template": "{prompt}, __style__", "wildcards_dir": str(wild),
                                    "max_new_tokens": 16, "temperature": 0.7})
        status = job.wait(progress=False, timeout_s=300)
        job_s = time.perf_counter() - t0
        assert status.state == "succeeded", (status, worker.log()[-3000:])
        rows = job.manifest().to_pylist()
        store, layout = client.job_store(job.spec)
    assert [r["item_index"] for r in rows] == list(range(200)) and all(r["status"] == "ok" for r in rows)
    for r in rows:
        source = SOURCES[r["item_index"] // 2]
        assert r["source_prompt"] == r["prompt"] == source
        assert r["revised_prompt"].strip() and r["revised_prompt"] != source
        assert r["expander"] == "prompt_expander" and len(r["expander_version"]) == 16
        assert 0 < r["expand_tokens"] <= 16
    assert all(rows[2 * k]["revised_prompt"] == rows[2 * k + 1]["revised_prompt"] for k in range(100))
    assert len({r["revised_prompt"] for r in rows}) > 90  # one description per source text, nearly all distinct
    meta = json.loads(_tar(store, layout, 0)["000000003.json"])
    assert (meta["source_prompt"], meta["revised_prompt"]) == (rows[3]["source_prompt"], rows[3]["revised_prompt"])
    stats = json.loads(store.get_bytes(layout.stats_key(1)))
    expand_s, shard_s = stats["seconds"]["expand"], stats["seconds"]["generate"]
    print(f"100 x 2 job with expansion: {job_s:.1f} s; shard 1: expansion {expand_s:.1f} s of {shard_s:.1f} s "
          f"generating ({expand_s / shard_s:.0%})")
    assert 0 < expand_s <= shard_s

    tar, index = store.get_bytes(layout.tar_key(1)), read_shard_index(store, layout, 1)
    with InferenceClient(triton_server.urls["grpc"], "grpc", timeout_s=120) as triton:  # shard 1 once more
        run_shard(job.spec, 1, store=store, layout=layout, infer=Infer(triton))
    assert store.get_bytes(layout.tar_key(1)) == tar
    assert read_shard_index(store, layout, 1).drop_columns(TIMINGS).equals(index.drop_columns(TIMINGS))


def test_empty_and_over_long_expansions_are_recorded_failed_with_their_reason(stack, s3_bucket):
    from producer import Client

    worker = stack.start_worker(GENIMG_CONCURRENCY=1)
    worker.wait_ready()
    long = "x" * 1995  # 1,995 characters pass; with " and more" they are over the 2,000-character limit
    with Client() as client:
        job = client.submit(["", "a cat", long], output=f"s3://{s3_bucket}/expand-fail", seed=1, images_per_prompt=4,
                            expand={"template": "{prompt}{| and more}", "model": None, "per": "item"})
        status = job.wait(progress=False, timeout_s=120)
        rows = job.manifest().to_pylist()
    # the shard is committed; its failed items make the job "failed", as non-finite images do (case C9)
    assert (status.state, status.shards_done, status.shards_failed) == ("failed", 1, 0), (status, worker.log()[-3000:])
    for i, r in enumerate(rows):
        assert r["expander"] == "template" and r["source_prompt"] == ["", "a cat", long][i // 4]
        assert (r["status"] == "failed") == (r["revised_prompt"] is None)
        if i < 4:
            assert r["revised_prompt"] == " and more" or r["reason"] == "expansion_empty"
        elif i < 8:
            assert r["status"] == "ok" and r["revised_prompt"] in ("a cat", "a cat and more")
        else:
            assert r["revised_prompt"] == long or r["reason"] == "expansion_too_long"
    failed = [r["reason"] for r in rows if r["status"] == "failed"]
    assert sorted(set(failed)) == ["expansion_empty", "expansion_too_long"], [r["revised_prompt"] for r in rows]
    assert status.items_failed == len(failed)
