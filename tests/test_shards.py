"""The shard protocol: deterministic tar + index, index written last, manifest, sha256 verification."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from webdataset.tariterators import group_by_keys, tar_file_expander

from genimg.errors import StorageUnavailableError, ValidationError
from genimg.imaging import decode, encode
from genimg.shards import ShardItem, build_shard, commit_shard, committed_shards, is_committed, read_shard_index, write_tar
from genimg.index import INDEX_SCHEMA, index_schema, index_from_parquet
from genimg.manifest import build_manifest
from genimg.verify import verify_manifest
from genimg.layout import Layout

pytestmark = pytest.mark.timeout(60)

JOB_ID = "0123456789abcdef0123456789abcdef"


def _image(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)


def make_items(indices, fmt: str = "png", failed=(), prompt_prefix: str = "a photo of digit") -> list[ShardItem]:
    items = []
    for i in indices:
        common = dict(item_index=i, seed=2**63 + i, model="txt2img", model_version="1", prompt=f"{prompt_prefix} {i % 10}")
        if i in failed:
            items.append(ShardItem(**common, reason="non_finite_output", infer_s=0.5))
        else:
            data = encode(_image(i), fmt, lossless=True) if fmt == "webp" else encode(_image(i), fmt)
            items.append(
                ShardItem(
                    **common, image=data, format=fmt, width=10, height=12, infer_s=0.25, encode_s=0.125,
                )
            )
    return items


@pytest.fixture
def layout(s3_bucket: str) -> Layout:
    return Layout(bucket=s3_bucket, prefix="datasets/test", job_id=JOB_ID)


# --------------------------------------------------------------------------- layout


def test_layout_keys_follow_the_documented_output_layout():
    lay = Layout.from_url("s3://my-bucket/datasets/", JOB_ID)
    assert lay.tar_key(42) == f"datasets/{JOB_ID}/shards/000042.tar"
    assert lay.index_key(42) == f"datasets/{JOB_ID}/shards/000042.parquet"
    assert lay.stats_key(42) == f"datasets/{JOB_ID}/shards/000042.stats.json"
    assert lay.manifest_prefix == f"datasets/{JOB_ID}/manifest/"
    assert lay.manifest_part_key(3) == f"datasets/{JOB_ID}/manifest/part-00003.parquet"
    assert lay.manifest_summary_key(3) == f"datasets/{JOB_ID}/manifest/_part-00003.json"
    assert lay.shard_of_index_key(lay.index_key(42)) == 42
    assert lay.shard_of_index_key(lay.stats_key(42)) is None
    assert Layout.from_url("s3://my-bucket", JOB_ID).tar_key(0) == f"{JOB_ID}/shards/000000.tar"


@pytest.mark.parametrize("job_id", ["", "../x", "a/b", "a" * 65, "job id"])
def test_layout_rejects_job_ids_that_are_not_simple_names(job_id):
    with pytest.raises(ValidationError):
        Layout(bucket="my-bucket", prefix="p", job_id=job_id)


def test_layout_rejects_shard_indices_outside_six_digits():
    lay = Layout(bucket="my-bucket", prefix="", job_id=JOB_ID)
    with pytest.raises(ValidationError):
        lay.tar_key(1_000_000)
    with pytest.raises(ValidationError):
        lay.tar_key(-1)


# --------------------------------------------------------------------------- building


def test_same_items_in_any_order_give_byte_identical_tar_and_index():
    lay = Layout(bucket="my-bucket", prefix="p", job_id=JOB_ID)
    items = make_items(range(100, 108), failed={103})
    first = build_shard(lay, 1, items)
    second = build_shard(lay, 1, list(reversed(make_items(range(100, 108), failed={103}))))
    assert first.tar_bytes == second.tar_bytes
    assert first.index_bytes == second.index_bytes


def test_tar_members_have_zero_mtime_and_owner_mode_0644_and_sorted_item_keys():
    lay = Layout(bucket="my-bucket", prefix="p", job_id=JOB_ID)
    payload = build_shard(lay, 0, make_items([7, 3, 5]))
    with tarfile.open(fileobj=io.BytesIO(payload.tar_bytes)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "000000003.png", "000000003.json", "000000005.png", "000000005.json", "000000007.png", "000000007.json",
    ]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        assert m.isreg()


def test_webdataset_reads_one_sample_per_item_keyed_by_nine_digit_item_index():
    lay = Layout(bucket="my-bucket", prefix="p", job_id=JOB_ID)
    items = make_items([11, 12], fmt="webp")
    payload = build_shard(lay, 0, items)
    samples = list(group_by_keys(tar_file_expander([{"url": "memory", "stream": io.BytesIO(payload.tar_bytes)}])))
    assert [s["__key__"] for s in samples] == ["000000011", "000000012"]
    for sample, item in zip(samples, items):
        assert sample["webp"] == item.image
        meta = json.loads(sample["json"])
        assert meta["item_index"] == item.item_index
        assert meta["seed"] == str(item.seed), "a uint64 seed is a decimal string: exact in every JSON reader"
        assert meta["prompt"] == item.prompt
        assert "infer_s" not in meta, "timings would break byte-identical retries"
        assert np.array_equal(decode(sample["webp"]), _image(item.item_index))


def _tarfile_reference(members: list[tuple[str, bytes]]) -> bytes:
    """The same members written through ``tarfile.TarFile.addfile`` (the writer ``write_tar`` replaced)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("sizes", [[], [0], [1], [511, 512, 513], [5000, 17, 0, 1024], [10240 - 1536], [10240 - 1024]])
def test_write_tar_gives_the_bytes_tarfile_writes_for_any_member_sizes(sizes):
    rng = np.random.default_rng(len(sizes))
    members = [(f"{k:09d}.{'png' if k % 2 else 'json'}", rng.integers(0, 256, n, dtype=np.uint8).tobytes())
               for k, n in enumerate(sizes)]
    data, spans = write_tar(members)
    assert data == _tarfile_reference(members)
    assert len(data) % tarfile.RECORDSIZE == 0
    for name, body in members:
        offset, size = spans[name]
        assert data[offset:offset + size] == body


@pytest.mark.parametrize("name", ["x" * 101, "bad\udce9.png"])
def test_write_tar_refuses_names_ustar_cannot_hold(name):
    with pytest.raises(ValidationError, match="tar member name"):
        write_tar([(name, b"data")])


def test_write_tar_refuses_a_repeated_name():
    with pytest.raises(ValidationError, match="duplicate"):
        write_tar([("a.png", b"1"), ("a.png", b"2")])


def test_index_offsets_and_sizes_point_at_each_image_member():
    lay = Layout(bucket="my-bucket", prefix="p", job_id=JOB_ID)
    payload = build_shard(lay, 3, make_items(range(30, 35), fmt="jpeg"))
    rows = payload.index.to_pylist()
    with tarfile.open(fileobj=io.BytesIO(payload.tar_bytes)) as tar:
        spans = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
    for row in rows:
        assert (row["tar_offset"], row["tar_size"]) == spans[f"{row['key']}.jpg"]
        assert row["tar_key"] == lay.tar_key(3)
        assert row["key"] == f"{row['item_index']:09d}"


def test_failed_items_are_index_rows_with_a_reason_and_no_tar_members():
    lay = Layout(bucket="my-bucket", prefix="p", job_id=JOB_ID)
    payload = build_shard(lay, 0, make_items(range(4), failed={1, 2}))
    with tarfile.open(fileobj=io.BytesIO(payload.tar_bytes)) as tar:
        names = tar.getnames()
    assert not [n for n in names if n.startswith(("000000001", "000000002"))]
    failed = [r for r in payload.index.to_pylist() if r["status"] == "failed"]
    assert [(r["item_index"], r["reason"], r["tar_offset"], r["sha256"]) for r in failed] == [
        (1, "non_finite_output", None, None),
        (2, "non_finite_output", None, None),
    ]
    assert payload.counts == {"items": 4, "items_ok": 2, "items_failed": 2, "image_bytes": payload.counts["image_bytes"]}
    assert payload.failed_by_reason == {"non_finite_output": 2}


def test_index_parquet_has_the_index_schema_and_round_trips():
    lay = Layout(bucket="my-bucket", prefix="p", job_id=JOB_ID)
    payload = build_shard(lay, 0, make_items(range(3), failed={2}))
    table = index_from_parquet(payload.index_bytes)
    assert table.schema.equals(INDEX_SCHEMA)
    assert table.schema.field("seed").type == pa.uint64()
    assert table.equals(payload.index)
    assert table["seed"].to_pylist() == [2**63, 2**63 + 1, 2**63 + 2]


def test_shard_items_reject_inconsistent_fields():
    base = dict(item_index=1, seed=1, model="m", model_version="1")
    with pytest.raises(ValidationError):
        ShardItem(**base)  # neither image nor reason
    with pytest.raises(ValidationError):
        ShardItem(**base, image=b"x", format="gif", width=1, height=1)
    with pytest.raises(ValidationError):
        ShardItem(**base, image=b"x", format="png", width=1, height=1, extra={"score": float("nan")})
    with pytest.raises(ValidationError):
        ShardItem(**{**base, "seed": 2**64}, reason="x")
    with pytest.raises(ValidationError):
        build_shard(Layout(bucket="my-bucket", prefix="", job_id=JOB_ID), 0, make_items([1, 1]))


# --------------------------------------------------------------------------- committing


def test_commit_uploads_tar_then_stats_then_index_last(make_s3_store, fault_proxy, layout):
    store = make_s3_store(endpoint_url=fault_proxy.endpoint_url)
    result = commit_shard(store, layout, 5, make_items(range(50, 54), failed={52}), stage_seconds={"shard": 2.0})
    puts = [r.path.split("?")[0] for r in fault_proxy.requests if r.method == "PUT"]
    assert [p.rsplit("/", 1)[-1] for p in puts] == ["000005.tar", "000005.stats.json", "000005.parquet"]
    assert is_committed(store, layout, 5)
    stats = json.loads(store.get_bytes(layout.stats_key(5)))
    assert stats == result.stats
    assert (stats["items"], stats["items_ok"], stats["items_failed"]) == (4, 3, 1)
    assert stats["failed_by_reason"] == {"non_finite_output": 1}
    assert set(stats["seconds"]) == {"infer", "encode", "upload", "shard"}
    assert stats["seconds"]["infer"] == pytest.approx(0.25 * 3 + 0.5)
    assert stats["tar_sha256"] == store.head(layout.tar_key(5)).sha256


def test_failure_between_tar_and_index_leaves_the_shard_uncommitted_and_a_retry_commits_identical_bytes(
    make_s3_store, fault_proxy, s3_store, layout
):
    faulty = make_s3_store(endpoint_url=fault_proxy.endpoint_url, s3_max_attempts=2)
    fault_proxy.fail(times=None, match=lambda r: r.method == "PUT" and r.path.split("?")[0].endswith(".parquet"))
    items = make_items(range(10, 14))
    with pytest.raises(StorageUnavailableError):
        commit_shard(faulty, layout, 1, items)
    assert s3_store.exists(layout.tar_key(1)), "the tar was written first"
    first_tar = s3_store.get_bytes(layout.tar_key(1))
    assert not is_committed(s3_store, layout, 1)
    assert committed_shards(s3_store, layout) == []
    assert build_manifest(s3_store, layout).num_rows == 0

    fault_proxy.clear()
    commit_shard(faulty, layout, 1, make_items(range(10, 14)))
    assert is_committed(s3_store, layout, 1)
    assert s3_store.get_bytes(layout.tar_key(1)) == first_tar
    assert build_manifest(s3_store, layout)["item_index"].to_pylist() == [10, 11, 12, 13]


def test_manifest_has_one_row_per_item_when_a_shard_is_committed_twice(s3_store, layout):
    commit_shard(s3_store, layout, 0, make_items(range(0, 4), failed={2}))
    commit_shard(s3_store, layout, 1, make_items(range(4, 8)))
    commit_shard(s3_store, layout, 0, make_items(range(0, 4), failed={2}))  # redelivered task
    manifest = build_manifest(s3_store, layout)
    assert manifest["item_index"].to_pylist() == list(range(8))
    assert manifest["status"].to_pylist().count("failed") == 1
    assert manifest.schema.equals(INDEX_SCHEMA)
    assert index_from_parquet(s3_store.get_bytes(layout.manifest_part_key(0))).equals(manifest)


def test_manifest_keeps_one_row_per_item_preferring_ok_when_an_item_is_in_two_shards(s3_store, layout):
    commit_shard(s3_store, layout, 0, make_items(range(0, 4), failed={3}))
    commit_shard(s3_store, layout, 1, make_items(range(3, 6)))  # overlaps item 3, ok this time
    manifest = build_manifest(s3_store, layout)
    assert manifest["item_index"].to_pylist() == [0, 1, 2, 3, 4, 5]
    row3 = manifest.filter(pc.equal(manifest["item_index"], 3)).to_pylist()[0]
    assert (row3["status"], row3["shard_index"]) == ("ok", 1)


def test_manifest_bytes_are_identical_when_built_twice(s3_store, layout):
    commit_shard(s3_store, layout, 2, make_items(range(20, 25)))
    commit_shard(s3_store, layout, 0, make_items(range(0, 5)))
    build_manifest(s3_store, layout)
    first = s3_store.get_bytes(layout.manifest_part_key(0))
    build_manifest(s3_store, layout)
    assert s3_store.get_bytes(layout.manifest_part_key(0)) == first
    assert read_shard_index(s3_store, layout, 2)["item_index"].to_pylist() == list(range(20, 25))


@pytest.mark.parametrize("ranged", [True, False], ids=["range-get", "whole-tar"])
def test_verify_manifest_checks_every_items_sha256_at_its_tar_offset(s3_store, layout, ranged):
    commit_shard(s3_store, layout, 0, make_items(range(0, 3), fmt="png"))
    commit_shard(s3_store, layout, 1, make_items(range(3, 6), fmt="webp", failed={4}))
    manifest = build_manifest(s3_store, layout)
    report = verify_manifest(s3_store, layout, ranged=ranged)
    assert report.ok, report.problems
    assert report.checked == 5
    for row in manifest.to_pylist():
        if row["status"] == "ok":
            data = s3_store.get_range(row["tar_key"], row["tar_offset"], row["tar_size"])
            assert np.array_equal(decode(data), _image(row["item_index"]))

    # Corrupt one image inside tar 1 (same size): exactly that item is reported.
    tar = bytearray(s3_store.get_bytes(layout.tar_key(1)))
    row5 = manifest.to_pylist()[5]
    tar[row5["tar_offset"] + row5["tar_size"] // 2] ^= 0xFF
    s3_store.put_bytes(layout.tar_key(1), bytes(tar), "application/x-tar")
    report = verify_manifest(s3_store, layout, manifest, ranged=ranged)
    assert len(report.problems) == 1 and "item 5" in report.problems[0]


def test_verify_manifest_reports_a_missing_tar(s3_store, layout):
    commit_shard(s3_store, layout, 0, make_items(range(2)))
    manifest = build_manifest(s3_store, layout)
    s3_store.delete_prefix(layout.tar_key(0))
    report = verify_manifest(s3_store, layout, manifest)
    assert len(report.problems) == 2 and all("missing" in p for p in report.problems)


def test_commit_refuses_a_store_for_another_bucket(s3_store):
    with pytest.raises(ValidationError):
        commit_shard(s3_store, Layout(bucket="other-bucket", prefix="", job_id=JOB_ID), 0, make_items([0]))


def test_profile_metadata_columns_follow_the_index_columns_in_index_tar_json_and_manifest(s3_store, layout):
    schema = index_schema({"label": "int", "score": "float"})
    items = [ShardItem(item_index=i, seed=i, model="m", model_version="abc", profile="p", params={"steps": i},
                       image=encode(_image(i), "png"), format="png", width=10, height=12,
                       extra={"label": i % 10, "score": 0.5 + i / 100}) for i in range(3)]
    commit_shard(s3_store, layout, 0, items, schema=schema)
    index = read_shard_index(s3_store, layout, 0)
    assert index.column_names == [*INDEX_SCHEMA.names, "label", "score"]
    assert index["label"].to_pylist() == [0, 1, 2]
    assert index["score"].to_pylist() == [0.5, 0.51, 0.52]
    assert index["params"].to_pylist() == ['{"steps":0}', '{"steps":1}', '{"steps":2}']
    assert index["profile"].to_pylist() == ["p"] * 3
    meta = items[1].metadata(JOB_ID)
    assert (meta["label"], meta["score"], meta["params"], meta["profile"]) == (1, 0.51, {"steps": 1}, "p")
    manifest = build_manifest(s3_store, layout)
    assert manifest.column_names == index.column_names and manifest.num_rows == 3
    with pytest.raises(ValidationError, match="no index column"):
        build_shard(layout, 1, [ShardItem(item_index=9, seed=9, model="m", model_version="1",
                                          image=b"x", format="png", width=1, height=1, extra={"other": 1})])


@pytest.mark.parametrize("names", [
    [f"{'k' * n}.png" for n in range(0, 97)],  # every length up to 100 bytes, the header's name field
    ["a/b/c.json", "ünïcode.png", "dir/" * 24 + "x.png", "p" * 90 + "/" + "n" * 60],  # tarfile's own paths
])
def test_write_tar_headers_are_tarfiles_for_names_of_any_length_and_kind(names):
    members = [(name, name.encode() * 3) for name in names]
    assert write_tar(members)[0] == _tarfile_reference(members)
