"""FileStore (``file://`` outputs) and open_store: the ObjectStore seam on a local directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from genimg.errors import PayloadTooLargeError, StorageError, StorageNotFoundError, ValidationError
from genimg.imaging import encode
from genimg.stores.files import LOCAL_BUCKET, FileStore
from genimg.settings import StorageSettings
from genimg.shards import ShardItem, commit_shard, committed_shards
from genimg.manifest import build_manifest
from genimg.verify import verify_manifest
from genimg.stores.s3 import S3Store
from genimg.stores.base import sha256_hex
from genimg.stores import open_job_store, open_store

pytestmark = pytest.mark.timeout(60)


def test_put_then_get_round_trips_bytes_and_reports_their_sha256(tmp_path: Path):
    store = FileStore(tmp_path / "root")
    put = store.put_bytes("a/b/c.bin", b"hello")
    assert (put.key, put.size_bytes, put.sha256, put.multipart) == ("a/b/c.bin", 5, sha256_hex(b"hello"), False)
    assert store.get_bytes("a/b/c.bin") == b"hello"
    assert (tmp_path / "root" / "a" / "b" / "c.bin").read_bytes() == b"hello"
    assert store.head("a/b/c.bin").sha256 == sha256_hex(b"hello")
    assert store.exists("a/b/c.bin") and not store.exists("a/b/missing")


def test_overwrite_replaces_the_whole_object_and_leaves_no_temporary_file(tmp_path: Path):
    store = FileStore(tmp_path)
    store.put_bytes("k/x", b"old old old")
    store.put_bytes("k/x", b"new")
    assert store.get_bytes("k/x") == b"new"
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["x"]


def test_range_reads_return_exact_bytes_and_refuse_reads_past_the_end(tmp_path: Path):
    store = FileStore(tmp_path)
    store.put_bytes("obj", bytes(range(100)))
    assert store.get_range("obj", 10, 5) == bytes(range(10, 15))
    assert store.get_range("obj", 0, 0) == b""
    with pytest.raises(StorageError):
        store.get_range("obj", 98, 5)
    with pytest.raises(ValidationError):
        store.get_range("obj", -1, 5)


def test_missing_keys_and_oversized_reads_raise_genimg_errors(tmp_path: Path):
    store = FileStore(tmp_path)
    with pytest.raises(StorageNotFoundError):
        store.get_bytes("nope")
    with pytest.raises(StorageNotFoundError):
        store.get_range("nope/deeper", 0, 1)
    store.put_bytes("big", b"x" * 100)
    with pytest.raises(PayloadTooLargeError):
        store.get_bytes("big", max_bytes=99)


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "../escape", "a//b", "./a", "a/", "a b", "a/.genimg-tmp-x"])
def test_keys_that_could_escape_the_root_or_are_malformed_are_refused(tmp_path: Path, key: str):
    with pytest.raises(ValidationError):
        FileStore(tmp_path / "root").put_bytes(key, b"x")
    assert not (tmp_path / "escape").exists()


def test_list_keys_uses_plain_string_prefixes_sorted_and_ignores_temporary_files(tmp_path: Path):
    store = FileStore(tmp_path)
    for key in ["job/shards/000001.tar", "job/shards/000000.tar", "job/job.json", "jobx/other", "top"]:
        store.put_bytes(key, b"1")
    (tmp_path / "job" / "shards" / ".genimg-tmp-000002.tar.abc").write_bytes(b"partial")
    assert store.list_keys("job/") == ["job/job.json", "job/shards/000000.tar", "job/shards/000001.tar"]
    assert store.list_keys("job") == ["job/job.json", "job/shards/000000.tar", "job/shards/000001.tar",
                                      "jobx/other"]
    assert store.list_keys("job/shards/000001") == ["job/shards/000001.tar"]
    assert store.list_keys("absent/") == []
    assert len(store.list_keys("")) == 5


def test_delete_prefix_removes_objects_and_their_empty_directories_only(tmp_path: Path):
    store = FileStore(tmp_path)
    for key in ["job/a/1", "job/a/2", "job/b", "keep/x"]:
        store.put_bytes(key, b"1")
    assert store.delete_prefix("job/") == 3
    assert not (tmp_path / "job").exists()
    assert store.list_keys("") == ["keep/x"]
    with pytest.raises(ValidationError):
        store.delete_prefix("")


def test_the_shard_protocol_commits_and_verifies_on_a_file_store(tmp_path: Path):
    store, layout = open_job_store(f"file://{tmp_path}/out", "0123456789abcdef0123456789abcdef")
    png = encode(np.full((4, 4, 3), 200, dtype=np.uint8), "png")
    for shard in (0, 1):
        items = [ShardItem(item_index=i, seed=i, model="noise2img", model_version="1", image=png, format="png",
                           width=4, height=4) for i in range(shard * 3, shard * 3 + 3)]
        commit_shard(store, layout, shard, items)
    assert committed_shards(store, layout) == [0, 1]
    manifest = build_manifest(store, layout)
    assert manifest.num_rows == 6
    assert verify_manifest(store, layout).ok
    assert (tmp_path / "out" / layout.job_id / "manifest" / "part-00000.parquet").is_file()


def test_open_store_picks_a_file_store_for_file_urls_and_an_s3_store_for_s3_urls(tmp_path: Path):
    store, prefix = open_store(f"file://{tmp_path}/run")
    assert isinstance(store, FileStore) and store.root == (tmp_path / "run").resolve() and prefix == ""
    assert store.bucket == LOCAL_BUCKET
    s3, s3_prefix = open_store("s3://my-bucket/a/b", StorageSettings(s3_endpoint_url="http://127.0.0.1:1"))
    try:
        assert isinstance(s3, S3Store) and s3.bucket == "my-bucket" and s3_prefix == "a/b"
    finally:
        s3.close()
    for url in ("http://x/y", "file://host/x", "/abs/path"):
        with pytest.raises(ValidationError):
            open_store(url)
