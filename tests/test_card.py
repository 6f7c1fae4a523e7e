"""The dataset card: a finished job's README.md parses with huggingface_hub's DatasetCard, lists the right
configs and licence, loads with `datasets` from the folder as it is, and is rewritten with the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from genimg import card, jobs
from genimg.profiles.registry import load_profiles
from genimg.spec import JobSpec

CONFIGS = [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]}]
"""One config: `datasets` picks one loader per repository, so the manifest's parquet parts cannot be a second one."""


@pytest.mark.parametrize(("licence", "hub"), [
    ("Apache-2.0", "apache-2.0"), ("MIT", "mit"),
    ("Apache-2.0 (weights trained by genimg on MNIST, CC BY-SA 3.0)", "apache-2.0"),
    ("MIT (package); trained on DigiFace-1M, whose own terms restrict use (see README)", None),
    ("CC-BY-NC-4.0", "cc-by-nc-4.0"), ("proprietary", None), ("", None),
])
def test_a_licence_maps_to_a_hub_id_only_when_it_is_one_spdx_id_and_a_note(licence: str, hub: str | None):
    assert card.hub_licence(licence) == hub


def test_the_bundled_profiles_licences():
    profiles = load_profiles()
    ids = {name: card.hub_licence(profiles.resolve(name).licence) for name in ("noise2img", "txt2img", "terrain",
                                                                                "faces", "faces_x4")}
    assert ids == {"noise2img": "apache-2.0", "txt2img": "apache-2.0", "terrain": "mit", "faces": None,
                   "faces_x4": None}


@pytest.mark.parametrize(("items", "category"), [(0, "n<1K"), (999, "n<1K"), (1_000, "1K<n<10K"),
                                                 (2_000, "1K<n<10K"), (123_456, "100K<n<1M"),
                                                 (10**9, "1B<n<10B")])
def test_size_categories_follow_the_ok_item_count(items: int, category: str):
    assert card.size_category(items) == category


def _parse(text: str) -> dict:
    from huggingface_hub import DatasetCard

    parsed = DatasetCard(text)
    assert parsed.text.lstrip().startswith("# ")
    return parsed.data.to_dict()


def test_a_faces_job_card_says_other_with_a_name_and_a_link():
    spec = JobSpec.create(model="faces", count=8, output="s3://some-bucket/faces")
    summary = {"items_ok": 8, "items_failed": 0, "num_shards": 1, "seconds": 1.0, "images_per_s": 8.0}
    meta = _parse(card.render(spec, summary, card.CardFacts(), None, sheet=False))
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "genimg-faces", "README.md")
    assert meta["task_categories"] == ["unconditional-image-generation"] and meta["configs"] == CONFIGS


def _download(store, prefix: str, dest: Path) -> None:
    for key in store.list_keys(f"{prefix}/"):
        path = dest / key[len(prefix) + 1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.get_bytes(key))


@pytest.mark.slow
def test_a_noise2img_job_writes_a_card_the_hub_parser_and_datasets_read(stack, s3_bucket: str, tmp_path: Path):
    from producer import Client

    stack.start_worker(GENIMG_CONCURRENCY=1).wait_ready()
    with Client() as client:
        job = client.submit(count=30, output=f"s3://{s3_bucket}/cards", seed=3, shard_size=10,
                            manifest_part_shards=2, dedup="near", name="digits-card")
        st = job.wait(progress=False, timeout_s=240)
        assert st.state == "succeeded" and st.summary["card"] == "README.md"
        store, layout = client.job_store(job.spec)
        prefix = layout.job_prefix
        text = store.get_bytes(f"{prefix}/README.md").decode()
        sheet = store.get_bytes(f"{prefix}/contact_sheet.png")
        meta = _parse(text)
        assert meta["license"] == "apache-2.0" and meta["size_categories"] == ["n<1K"]
        assert meta["task_categories"] == ["unconditional-image-generation"]
        assert meta["tags"] == ["synthetic", "genimg"] and meta["pretty_name"] == "digits-card"
        assert meta["configs"] == CONFIGS
        manifest = job.manifest()
        assert manifest.column_names[-1] == "duplicate_of"
        features = meta["dataset_info"]["features"]
        assert [f["name"] for f in features] == ["png", "json", "__key__", "__url__"]
        assert {"name": "seed", "dtype": "string"} in features[1]["struct"]
        for name in manifest.column_names:
            assert f"| `{name}` |" in text, f"the body lists the manifest column {name}"
        assert "![contact sheet](contact_sheet.png)" in text and sheet.startswith(b"\x89PNG")
        assert f"| ok | {st.summary['items_ok']} |" in text and "## Duplicates" in text

        jobs.finalize_if_complete(stack.redis, client.keys, store, layout, job.spec)  # the card again
        again = store.get_bytes(f"{prefix}/README.md").decode()
        measured = [i for i, (a, b) in enumerate(zip(text.splitlines(), again.splitlines())) if a != b]
        assert len(text.splitlines()) == len(again.splitlines()) and all(
            "images/s over" in text.splitlines()[i] for i in measured), "only the throughput line may differ"
        assert store.get_bytes(f"{prefix}/contact_sheet.png") == sheet
        _download(store, prefix, tmp_path / "job")

    datasets = pytest.importorskip("datasets")
    cache = str(tmp_path / "hf-cache")
    images = datasets.load_dataset(str(tmp_path / "job"), split="train", cache_dir=cache)  # the card's config
    assert images.num_rows == st.summary["items_ok"] and images.column_names == ["png", "json", "__key__", "__url__"]
    assert images[0]["json"]["seed"] == str(manifest["seed"][0].as_py())
    rows = datasets.load_dataset("parquet", data_files=str(tmp_path / "job" / card.MANIFEST_GLOB), split="train",
                                 cache_dir=cache)
    assert rows.num_rows == 30 and rows.column_names == manifest.column_names
    assert rows.features["seed"].dtype == "uint64" and rows.features["duplicate_of"].dtype == "int64"
