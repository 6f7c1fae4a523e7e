"""`genimg demo` end to end at small sizes: real Redis, the session's Triton and moto, workers it starts itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from producer.demo import digit_in_prompt, read_prompts
from tests.fixtures.triton import EXPANDER_UNAVAILABLE
from tests.fixtures.workers import REDIS_URL


@pytest.mark.slow
def test_demo_writes_every_manifest_contact_sheet_and_summary_and_stops_its_workers(
        tmp_path: Path, triton_server, moto_s3_endpoint: str):
    out, state = tmp_path / "demo-out", tmp_path / "state"
    n_expand = 0 if EXPANDER_UNAVAILABLE else 4  # the expansion job needs SmolLM2 (tests/fixtures/triton.py)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENIMG_")}
    env.update(GENIMG_REDIS_URL=REDIS_URL, GENIMG_TRITON_URL=triton_server.urls["grpc"],
               GENIMG_S3_ENDPOINT_URL=moto_s3_endpoint, GENIMG_S3_ACCESS_KEY_ID="testing",
               GENIMG_S3_SECRET_ACCESS_KEY="testing", GENIMG_LOCAL_DIR=str(state), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "producer.cli", "demo", "--prompts-limit", "10",
                           "--images-per-prompt", "2", "--noise-count", "50", "--faces-count", "24", "--expand-count", str(n_expand),
                           "--workers", "1", "--shard-size", "20",
                           "--out", str(out), "--no-progress"], env=env, capture_output=True, text=True, timeout=400,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    jobs = (("txt2img", 20), ("noise2img", 50), ("faces_x4", 24)) + ((("expand", 8),) if n_expand else ())
    for name, rows in jobs:
        table = pq.read_table(out / name / "manifest.parquet")
        assert table.num_rows == rows
        keys = table.column("key").to_pylist()
        assert len(set(keys)) == rows
        assert set(table.column("status").to_pylist()) == {"ok"}
        with Image.open(out / name / "contact_sheet.png") as sheet:
            sheet.load()
            assert sheet.width > 112 and sheet.height > 112
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["images_ok"] == rows and summary["images_failed"] == 0 and summary["duplicate_keys"] == 0
        assert summary["images_per_s"] > 0
        for stage in ("infer_per_item", "encode_per_item", "upload_per_shard"):
            assert summary["seconds_per_stage"][stage]["p50"] <= summary["seconds_per_stage"][stage]["p95"]
        assert len(list((out / name / "shards").glob("*.tar"))) == summary["shards_committed"]

    txt = json.loads((out / "txt2img" / "summary.json").read_text())
    assert txt["verifier_agreement_items"] == 20
    assert txt["verifier_agreement"] >= 0.7  # the model eval's text_cond_acc is ~0.9 on unseen phrasings
    overall = json.loads((out / "summary.json").read_text())
    faces = json.loads((out / "faces_x4" / "summary.json").read_text())
    assert faces["image_size"] == [256, 256] and faces["label_histogram"] is None
    if n_expand:  # source and revised prompts of the expansion job (its sheet shows both)
        expand = pq.read_table(out / "expand" / "manifest.parquet").to_pylist()
        assert [r["source_prompt"] for r in expand] == [p for p in read_prompts(
            Path(__file__).resolve().parents[1] / "examples" / "expand_sources.txt", 4) for _ in range(2)]
        assert all(r["revised_prompt"] and r["revised_prompt"] != r["source_prompt"] for r in expand)
        assert json.loads((out / "expand" / "summary.json").read_text())["expander"] == "prompt_expander"
    assert overall["images_ok"] == 94 + 2 * n_expand and overall["stack_started_by_demo"] is True
    assert not (state / "local.json").exists()  # it stopped the workers it started


def test_every_example_prompt_names_exactly_one_digit_and_each_digit_has_prompts(repo_root: Path):
    prompts = read_prompts(repo_root / "examples" / "prompts.txt")
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
    digits = [digit_in_prompt(p) for p in prompts]
    assert None not in digits
    assert np.bincount(digits, minlength=10).min() >= 10


def test_example_prompts_are_phrasings_never_used_in_training(repo_root: Path):
    from genimg.models.data import TRAIN_TEMPLATES, captions_for

    seen = {c.lower() for d in range(10) for c in captions_for(d, TRAIN_TEMPLATES)}
    assert [p for p in read_prompts(repo_root / "examples" / "prompts.txt") if p.lower() in seen] == []


@pytest.mark.parametrize(("prompt", "digit"), [
    ("a hand-written 3", 3), ("digit seven drawn in ink", 7), ("sevn", 7), ("the numbr 4", 4),
    ("eight with stacked loops", 8), ("someone", None), ("a 3 and a five", None), ("42", None), ("", None),
    ("twoo", 2), ("ZERO", 0), ("a 5, five", 5),
])
def test_digit_in_prompt_reads_numerals_number_words_and_the_misspellings_used(prompt: str, digit: int | None):
    assert digit_in_prompt(prompt) == digit
