"""Duplicates: the band index finds exactly the pairs a brute-force search finds; a finished job reports
exact and near duplicates (dedup.json, _SUCCESS) and, when it asks, marks duplicate_of in its manifest
without deleting a row."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from genimg import jobs
from genimg.dedup import DEDUP_OBJECT, Scan, find_duplicates, hamming, near_pairs, with_duplicate_of
from genimg.errors import ValidationError
from genimg.imaging import encode, phash
from genimg.manifest import PartPlan, read_part, read_summary
from genimg.seeds import item_seed
from genimg.index import index_schema
from genimg.shards import ShardItem, commit_shard
from genimg.stores.base import sha256_hex
from tests.fixtures.producer import ProducerEnv


def _brute(values: np.ndarray, t: int) -> set[tuple[int, int]]:
    d = hamming(values[:, None], values[None, :])
    i, j = np.nonzero(np.triu(d <= t, 1))
    return set(zip(i.tolist(), j.tolist()))


def _flip(rng: np.random.Generator, value: int, bits: int) -> int:
    for b in rng.choice(64, bits, replace=False):
        value ^= 1 << int(b)
    return value


@pytest.mark.parametrize("t", [0, 1, 2, 4, 6, 8])
def test_the_band_index_finds_exactly_the_pairs_a_brute_force_search_finds(t: int):
    rng = np.random.default_rng(t)
    base = [int(x) for x in rng.integers(0, 2**63, 300, dtype=np.int64)]
    clusters = [_flip(rng, base[k % 40], int(rng.integers(1, 2 * t + 2))) for k in range(500)]  # near and far
    values = np.unique(np.array(base + clusters, dtype=np.uint64))
    i, j = near_pairs(values, t)
    assert set(zip(i.tolist(), j.tolist())) == _brute(values, t)
    assert bool(np.all(i < j)) and len(set(zip(i.tolist(), j.tolist()))) == len(i)


def test_hamming_counts_differing_bits_of_64():
    a = np.array([0, 0, 2**64 - 1, 0b1011], dtype=np.uint64)
    b = np.array([0, 1, 0, 0b0110], dtype=np.uint64)
    assert hamming(a, b).tolist() == [0, 1, 64, 3]


def _part(rows: list[tuple[int, str, str | None, str | None]]) -> pa.Table:
    """A manifest part's dedup columns: (item_index, status, sha256, phash)."""
    return pa.table({"item_index": pa.array([r[0] for r in rows], pa.int64()),
                     "status": [r[1] for r in rows], "sha256": [r[2] for r in rows],
                     "phash": pa.array([r[3] for r in rows], pa.string())})


def test_groups_take_their_lowest_item_index_and_chains_of_near_pairs_are_one_group():
    sha = [sha256_hex(str(k).encode()) for k in range(10)]
    ph = lambda v: f"{v:016x}"  # noqa: E731
    parts = [
        _part([(0, "ok", sha[0], ph(0b0)), (1, "ok", sha[1], ph(0b111)), (2, "failed", None, None),
               (3, "ok", sha[0], ph(0b0))]),
        _part([(4, "ok", sha[4], ph(0b111_1111)), (5, "ok", sha[5], ph(0xFFFF_FFFF_0000_0000)),
               (6, "ok", sha[1], None), (7, "ok", sha[7], ph(0xFFFF_FFFF_0000_0011))]),
    ]
    dups = find_duplicates(parts, max_distance=4)
    assert dups.idx.tolist() == [0, 1, 3, 4, 5, 6, 7]
    # exact: 3 is 0's image, 6 is 1's; near: 0 ~ 1 (3 bits), 1 ~ 4 (4 bits) chain 0-1-3-4 (0 and 4 are 7 apart)
    assert dups.duplicate_of("exact").tolist() == [-1, -1, 0, -1, -1, 1, -1]
    assert dups.duplicate_of("near").tolist() == [-1, 0, 0, 0, -1, 1, 5]  # 6 has no pHash: exact only
    report = dups.report("near")
    assert (report.items, report.items_without_phash, report.exact_duplicates, report.exact_groups) == (7, 1, 2, 2)
    assert (report.near_duplicates, report.near_groups, report.near_distance) == (5, 3, 4)
    assert report.exact_examples == [[0, 3], [1, 6]]
    assert report.near_examples == [[0, 1, 3], [0, 4, 7], [5, 7, 2]]

    marked = with_duplicate_of(parts[1], dups, "near")
    assert marked.column_names[-1] == "duplicate_of" and marked["duplicate_of"].to_pylist() == [0, None, 1, 5]
    assert with_duplicate_of(parts[0], dups, "exact")["duplicate_of"].to_pylist() == [None, None, None, 0]
    with pytest.raises(ValidationError, match="dedup"):
        dups.duplicate_of("fuzzy")
    with pytest.raises(ValidationError, match="max_distance"):
        Scan().find(65)


def test_an_empty_scan_reports_zeros():
    report = find_duplicates([_part([(0, "failed", None, None)])]).report()
    assert (report.items, report.exact_duplicates, report.near_duplicates, report.near_examples) == (0, 0, 0, [])


def _image(k: int) -> np.ndarray:
    """Item ``k``'s pixels: items 0-9 distinct patterns; 10-19 repeat them (exact); 20-24 are 0-4 with the top
    left ``k - 19`` x ``k - 19`` pixels inverted (near: 0 to 4 pHash bits apart; unrelated ones are ~26 apart)."""
    rng = np.random.default_rng(k % 10)
    img = (rng.random((16, 16, 1)) * 255).astype(np.uint8).repeat(4, 0).repeat(4, 1)
    if k >= 20:
        img = img.copy()
        img[:k - 19, :k - 19, 0] = 255 - img[:k - 19, :k - 19, 0]
    return img


def _commit_images(env: ProducerEnv, spec, shard: int) -> None:
    store, layout = env.client.job_store(spec)
    start, stop = spec.shard_plan().shard_range(shard)
    items = []
    for i in range(start, stop):
        img = _image(i)
        items.append(ShardItem(item_index=i, seed=item_seed(spec.seed, i), model=spec.model, model_version="1",
                               image=encode(img, "png"), format="png", width=64, height=64, phash=phash(img)))
    commit_shard(store, layout, shard, items, schema=index_schema(spec.metadata_columns))
    jobs.mark_done(env.redis, env.client.keys, spec.job_id, shard, stop - start, 0)
    jobs.compact_part_if_complete(env.redis, env.client.keys, store, layout, spec, shard)


@pytest.mark.parametrize("mode", [None, "exact", "near"])
def test_a_finished_job_reports_duplicates_and_marks_them_only_when_it_asks(producer_env: ProducerEnv, mode):
    env = producer_env
    job = env.client.submit(count=25, shard_size=5, manifest_part_shards=2, output=env.output, dedup=mode)
    spec = job.spec
    store, layout = env.client.job_store(spec)
    for shard in range(5):
        _commit_images(env, spec, shard)
    st = job.wait(progress=False, timeout_s=60, poll_s=0.05)
    assert st.state == "succeeded"
    table = job.manifest()
    assert table.num_rows == 25, "no row is ever deleted"

    report = json.loads(store.get_bytes(f"{layout.job_prefix}/{DEDUP_OBJECT}"))
    assert (report["items"], report["exact_duplicates"], report["exact_groups"]) == (25, 10, 10)
    assert report["exact_examples"][:3] == [[0, 10], [1, 11], [2, 12]]
    assert [(a, b) for a, b, _ in report["near_examples"]] == [(k - 20, k) for k in range(20, 25)]
    bits = [d for _, _, d in report["near_examples"]]
    assert max(bits) <= 4 < min(bits) + 5 and max(bits) > 0
    assert (report["near_duplicates"], report["near_groups"]) == (15, 10)
    assert report["marked"] == mode and st.summary["dedup"]["exact_duplicates"] == 10

    if mode is None:
        assert "duplicate_of" not in table.column_names
        return
    of = table["duplicate_of"].to_pylist()
    assert of[:10] == [None] * 10 and of[10:20] == list(range(10))
    assert of[20:] == ([None] * 5 if mode == "exact" else [0, 1, 2, 3, 4])
    plan = PartPlan.for_spec(spec)
    before = [store.get_bytes(layout.manifest_part_key(p)) for p in range(plan.num_parts)]
    for p in range(plan.num_parts):
        summary = read_summary(store, layout, p)
        assert summary.final and summary.sha256 == sha256_hex(before[p]), "summaries follow the rewritten parts"
        assert read_part(store, layout, p).column_names[-1] == "duplicate_of"
    assert st.summary["manifest"]["bytes"] == sum(len(b) for b in before)

    jobs.finalize_if_complete(env.redis, env.client.keys, store, layout, spec)  # again: the same manifest
    assert [store.get_bytes(layout.manifest_part_key(p)) for p in range(plan.num_parts)] == before


@pytest.mark.parametrize("mode", [None, "exact"])
def test_a_bulk_job_that_did_not_ask_is_not_scanned_and_its_card_says_so(producer_env: ProducerEnv, monkeypatch,
                                                                          mode):
    """Above REPORT_MAX_ITEMS the finaliser reads only what the card's contact sheet needs (a 10^8-item job's
    finalisation stays seconds), unless the job asked for dedup."""
    from genimg import dedup
    from genimg.card import CARD_OBJECT

    monkeypatch.setattr(dedup, "REPORT_MAX_ITEMS", 24)
    env = producer_env
    job = env.client.submit(count=25, shard_size=5, manifest_part_shards=2, output=env.output, dedup=mode)
    store, layout = env.client.job_store(job.spec)
    for shard in range(5):
        _commit_images(env, job.spec, shard)
    st = job.wait(progress=False, timeout_s=60, poll_s=0.05)
    assert st.state == "succeeded" and job.manifest().num_rows == 25
    report = json.loads(store.get_bytes(f"{layout.job_prefix}/{DEDUP_OBJECT}"))
    card_text = store.get_bytes(f"{layout.job_prefix}/{CARD_OBJECT}").decode()
    if mode is None:
        assert report["items"] == 0 and report["exact_duplicates"] == 0
        assert report["not_scanned"].startswith("25 items > 24")
        assert "Not scanned: 25 items > 24" in card_text
    else:
        assert (report["items"], report["exact_duplicates"]) == (25, 10) and "not_scanned" not in report
        assert "Not scanned" not in card_text
