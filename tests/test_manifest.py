"""The manifest in parts: one dataset for pyarrow, pandas and Hugging Face datasets; compaction as ranges
complete; a finaliser that writes only what is missing; resume; O(1) job counts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from genimg import jobs
from genimg.layout import SUCCESS_OBJECT
from genimg.manifest import (
    ManifestTooLargeError,
    PartPlan,
    build_manifest,
    finalize_parts,
    job_schema,
    read_summary,
    summarised_parts,
)
from tests.fixtures.producer import ProducerEnv, commit_synthetic_shard


def _commit(env: ProducerEnv, spec, shard: int, failed: tuple[int, ...] = ()) -> None:
    """Commit a shard and compact its part, as a worker does after its commit."""
    commit_synthetic_shard(env, spec, shard, failed=failed)
    store, layout = env.client.job_store(spec)
    jobs.compact_part_if_complete(env.redis, env.client.keys, store, layout, spec, shard)


def _single_file(env: ProducerEnv, spec) -> pa.Table:
    """What one manifest file of the whole job holds: every committed index, one row per item."""
    store, layout = env.client.job_store(spec)
    n = spec.shard_plan().num_shards
    return build_manifest(store, layout, write=False, plan=PartPlan(n, n), schema=job_schema(spec))


def test_a_manifest_over_several_parts_reads_as_one_dataset_in_pyarrow_pandas_and_hf_datasets(
        producer_env: ProducerEnv, tmp_path: Path):
    env = producer_env
    root = env.spec_settings.local_output_root
    job = env.client.submit(count=53, shard_size=5, manifest_part_shards=3, output=f"file://{root}/runs")
    spec = job.spec
    assert PartPlan.for_spec(spec).num_parts == 4  # 11 shards in parts of 3
    for shard in range(11):
        _commit(env, spec, shard, failed=(7, 31) if shard in (1, 6) else ())
    st = job.wait(progress=False, timeout_s=30, poll_s=0.05)
    assert st.state == "failed" and st.summary["items_failed"] == 2  # two failed items
    assert st.summary["manifest"] == {"prefix": "manifest/", "parts": 4, "rows": 53,
                                      "bytes": st.summary["manifest"]["bytes"]}
    directory = root / "runs" / job.job_id / "manifest"
    assert sorted(p.name for p in directory.glob("*.parquet")) == [f"part-0000{i}.parquet" for i in range(4)]

    single = _single_file(env, spec)
    assert single.num_rows == 53 and single.column("item_index").to_pylist() == list(range(53))

    dataset = pads.dataset(directory, format="parquet").to_table()
    assert dataset.equals(single)
    assert pq.read_table(directory).equals(single)

    import pandas as pd

    pd.testing.assert_frame_equal(pd.read_parquet(directory), single.to_pandas())

    datasets = pytest.importorskip("datasets")
    hf = datasets.load_dataset("parquet", data_files=str(directory / "part-*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert hf.num_rows == 53 and hf.column_names == single.column_names
    assert hf.to_list() == single.to_pylist()

    assert job.manifest().equals(single)
    assert pa.Table.from_batches(list(job.iter_manifest(batch_rows=7))).equals(single)


def test_workers_compact_complete_ranges_and_the_finaliser_writes_only_the_rest(producer_env: ProducerEnv,
                                                                                tmp_path: Path):
    env = producer_env
    job = env.client.submit(count=25, shard_size=5, manifest_part_shards=2, output=env.output)
    spec = job.spec
    store, layout = env.client.job_store(spec)
    _commit(env, spec, 0)
    assert summarised_parts(store, layout) == []  # shard 1 of part 0 not committed yet
    _commit(env, spec, 1)
    assert summarised_parts(store, layout) == [0] and read_summary(store, layout, 0).final
    _commit(env, spec, 2)
    jobs.mark_failed(env.redis, env.client.keys, spec.job_id, 3, "retries_exhausted: triton_unavailable")
    _commit(env, spec, 4)
    assert summarised_parts(store, layout) == [0, 2]  # part 1 has a failed shard: left to the finaliser

    first = store.get_bytes(layout.manifest_part_key(0))
    st = job.wait(progress=False, timeout_s=30, poll_s=0.05)
    assert (st.state, st.summary["items_ok"], st.summary["manifest"]["rows"]) == ("failed", 20, 20)
    assert st.summary["failed_shards"] == {"3": "retries_exhausted: triton_unavailable"}
    assert read_summary(store, layout, 1).shards_missing == (3,)
    assert store.get_bytes(layout.manifest_part_key(0)) == first
    again = finalize_parts(store, layout, PartPlan.for_spec(spec), schema=job_schema(spec))
    assert (again.parts, again.parts_written, again.rows, again.shards_missing) == (3, 1, 20, 1)

    with pytest.raises(ManifestTooLargeError):
        job.manifest(max_rows=10)

    assert job.resume() == 1  # shard 3 again: its part and _SUCCESS are out of date
    assert summarised_parts(store, layout) == [0, 2]
    assert not store.exists(f"{layout.job_prefix}/{SUCCESS_OBJECT}")
    assert job.status().items_done == 20
    _commit(env, spec, 3)
    assert read_summary(store, layout, 1).final
    st = job.wait(progress=False, timeout_s=30, poll_s=0.05)
    assert (st.state, st.items_done, st.summary["manifest"]["rows"]) == ("succeeded", 25, 25)
    assert job.manifest().equals(_single_file(env, spec))

    out = tmp_path / "m.jsonl"
    from producer.commands import _write_batches

    assert _write_batches(job.iter_manifest(batch_rows=4), out) == 25
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["item_index"] for r in rows] == list(range(25))
    assert all(isinstance(r["seed"], str) and "reason" not in r for r in rows)  # exact in any JSON reader, no nulls


def test_job_counts_come_from_totals_kept_once_per_shard_and_are_rebuilt_when_missing(producer_env: ProducerEnv):
    env = producer_env
    job = env.client.submit(count=30, shard_size=10, output=env.output)
    commit_synthetic_shard(env, job.spec, 0, failed=(3,))
    commit_synthetic_shard(env, job.spec, 0, failed=(3,))  # a redelivered shard counts once
    commit_synthetic_shard(env, job.spec, 2)
    assert (job.status().items_done, job.status().items_failed) == (19, 1)
    totals = env.client.keys.job(job.job_id, "totals")
    assert env.redis.hgetall(totals) == {b"items_ok": b"19", b"items_failed": b"1"}
    env.redis.delete(totals)  # a job whose done-hash predates the totals
    st = job.status()
    assert (st.shards_done, st.items_done, st.items_failed) == (2, 19, 1)
    assert env.redis.hgetall(totals) == {b"items_ok": b"19", b"items_failed": b"1"}
