"""A finished job's output read by the tools a dataset user reaches for first, unchanged.

One txt2img and one noise2img job run on the real stack (a `genimg worker` process, the session's
Triton, Redis and moto's S3 server); their output folder is downloaded and read with webdataset,
Hugging Face datasets (webdataset and parquet loaders), pandas, polars, DuckDB and a torch DataLoader.
Every reader must see as many items as the manifest, and one item's bytes and metadata as the manifest
says. The item JSON must hold only numbers every JSON reader keeps exactly (JavaScript's included).
"""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genimg.imaging import decode
from genimg.stores.base import sha256_hex
from genimg.stores.s3 import S3Store
from tests.fixtures.s3 import storage_settings_for
from tests.fixtures.workers import running_stack

pytestmark = pytest.mark.slow

PROMPTS = [f"a handwritten {d}" for d in range(10)] + ["the number seven", "ünïcode 😀 naïve"]
MAX_SAFE_INTEGER = 2**53 - 1


@dataclass
class Output:
    """A finished job's folder, downloaded, and its manifest as the pipeline wrote it."""

    root: Path
    manifest: pa.Table
    profile: str

    @property
    def tars(self) -> list[str]:
        return sorted(str(p) for p in (self.root / "shards").glob("*.tar"))

    @property
    def parts(self) -> str:
        return str(self.root / "manifest" / "part-*.parquet")

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.manifest.to_pylist() if r["status"] == "ok"]

    def sample(self) -> dict[str, Any]:
        """The manifest row of the item the readers are checked on (one in the middle)."""
        return self.ok[len(self.ok) // 2]

    def image_bytes(self, row: dict[str, Any]) -> bytes:
        with open(self.root / row["tar_key"].split(f"/{self.root.name}/", 1)[1], "rb") as f:
            f.seek(row["tar_offset"])
            return f.read(row["tar_size"])


def _download(store: S3Store, job_prefix: str, dest: Path) -> None:
    for key in store.list_keys(f"{job_prefix}/"):
        path = dest / key[len(job_prefix) + 1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.get_bytes(key))


@pytest.fixture(scope="module")
def outputs(triton_server, moto_s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Output]:
    """The txt2img and noise2img jobs, run once for the module by one real worker."""
    from producer import Client

    tmp = tmp_path_factory.mktemp("readers")
    settings = storage_settings_for(moto_s3_endpoint)
    bucket = f"genimg-readers-{uuid.uuid4().hex[:10]}"
    store = S3Store(settings, bucket)
    store.ensure_bucket()
    out: dict[str, Output] = {}
    try:
        with running_stack(triton_server.urls["grpc"], moto_s3_endpoint, bucket, tmp) as stack:
            stack.start_worker(GENIMG_CONCURRENCY=1).wait_ready()
            with Client() as client:
                jobs = {"txt2img": client.submit(PROMPTS, images_per_prompt=2, output=f"s3://{bucket}/runs",
                                                 seed=2**63 - 1, shard_size=7, sub_batch_size=4),
                        "noise2img": client.submit(count=19, output=f"s3://{bucket}/runs", seed=5, shard_size=6)}
                for name, job in jobs.items():
                    assert job.wait(progress=False, timeout_s=240).state == "succeeded"
                    root = tmp / name / job.job_id
                    _download(store, client.job_store(job.spec)[1].job_prefix, root)
                    out[name] = Output(root, job.manifest(), name)
        yield out
    finally:
        store.delete_prefix("", everything=True)
        store.client.delete_bucket(Bucket=bucket)
        store.close()


@pytest.fixture(params=["txt2img", "noise2img"])
def output(request: pytest.FixtureRequest, outputs: dict[str, Output]) -> Output:
    return outputs[request.param]


def _check_meta(meta: dict[str, Any], row: dict[str, Any]) -> None:
    """An item's JSON against its manifest row."""
    assert meta["seed"] == str(row["seed"]) and int(meta["seed"]) == row["seed"]
    for name in ("job_id", "item_index", "key", "model", "model_version", "profile", "width", "height", "format",
                 "sha256", "label", "score"):
        assert meta[name] == row[name], name
    assert meta.get("prompt") == row["prompt"]
    assert json.dumps(meta["params"], sort_keys=True, separators=(",", ":")) == row["params"]


def _check_pixels(pixels: Any, raw: bytes) -> None:
    """A reader's decoded image (PIL; grey, or grey made RGB) against the stored bytes decoded by genimg."""
    want = decode(raw)
    got = np.asarray(pixels)
    got = got.reshape(*got.shape[:2], -1)
    assert got.shape[:2] == want.shape[:2]
    assert all(np.array_equal(got[:, :, [c]], want) for c in range(got.shape[2]))


def test_the_manifest_matches_the_shards_it_indexes(output: Output):
    assert output.manifest.num_rows == len(output.ok) > 0
    for row in output.ok:
        assert sha256_hex(output.image_bytes(row)) == row["sha256"]
        assert row["phash"] is not None and len(row["phash"]) == 16


def test_webdataset_decodes_every_item_with_the_manifests_bytes_and_metadata(output: Output):
    import webdataset as wds

    raw = {s["__key__"]: s for s in wds.WebDataset(output.tars, shardshuffle=False)}
    decoded = {s["__key__"]: s for s in wds.WebDataset(output.tars, shardshuffle=False).decode("pil")}
    assert sorted(raw) == sorted(decoded) == sorted(r["key"] for r in output.ok)
    row = output.sample()
    assert raw[row["key"]]["png"] == output.image_bytes(row)
    _check_pixels(decoded[row["key"]]["png"], output.image_bytes(row))
    _check_meta(decoded[row["key"]]["json"], row)


def test_hugging_face_datasets_loads_the_shards_and_the_manifest(output: Output, tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    cache = str(tmp_path / "hf-cache")
    images = datasets.load_dataset("webdataset", data_files={"train": output.tars}, split="train", cache_dir=cache)
    assert images.num_rows == len(output.ok)
    row = output.sample()
    item = images[images["__key__"].index(row["key"])]
    _check_pixels(item["png"], output.image_bytes(row))
    _check_meta(item["json"], row)

    folder = datasets.load_dataset(str(output.root), split="train", cache_dir=cache)  # the card's config
    assert folder.num_rows == len(output.ok) and folder.features == images.features
    _check_meta(folder[images["__key__"].index(row["key"])]["json"], row)

    manifest = datasets.load_dataset("parquet", data_files=output.parts, split="train", cache_dir=cache)
    assert manifest.num_rows == output.manifest.num_rows
    assert manifest.column_names == output.manifest.column_names
    assert manifest[output.ok.index(row)] == row


def test_pandas_polars_and_duckdb_read_the_manifest_parts(output: Output):
    import duckdb
    import pandas as pd
    import polars as pl

    row = output.sample()
    frame = pd.read_parquet(output.root / "manifest")
    assert len(frame) == output.manifest.num_rows
    got = frame[frame["item_index"] == row["item_index"]].iloc[0].to_dict()
    assert {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in got.items()} == row

    polars = pl.read_parquet(output.parts)
    assert polars.height == output.manifest.num_rows and polars.schema["seed"] == pl.UInt64
    assert polars.filter(pl.col("item_index") == row["item_index"]).to_dicts() == [row]

    con = duckdb.connect()
    count, seed, sha, phash = con.execute(
        "SELECT count(*) OVER (), seed, sha256, phash FROM read_parquet(?) WHERE item_index = ?",
        [output.parts, row["item_index"]]).fetchone()
    assert (count, seed, sha, phash) == (1, row["seed"], row["sha256"], row["phash"])
    assert con.execute("SELECT count(*) FROM read_parquet(?)", [output.parts]).fetchone()[0] == \
        output.manifest.num_rows


def test_a_torch_dataloader_batches_the_webdataset(output: Output):
    torch = pytest.importorskip("torch")
    import webdataset as wds
    from torch.utils.data import DataLoader

    dataset = wds.WebDataset(output.tars, shardshuffle=False).decode("torchrgb").to_tuple("png", "json")
    seen, keys = 0, []
    for images, meta in DataLoader(dataset, batch_size=4, num_workers=0):
        assert images.dtype == torch.float32 and tuple(images.shape[1:]) == (3, 112, 112)
        seen += images.shape[0]
        keys += list(meta["key"])
        assert all(isinstance(s, str) for s in meta["seed"])
    assert seen == len(output.ok) and keys == [r["key"] for r in output.ok]


def _exact_numbers(value: Any, where: str) -> list[str]:
    """Numbers in a JSON value (parsed with Decimal) that a reader using IEEE doubles would change."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _exact_numbers(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _exact_numbers(v, f"{where}[{i}]")]
    if isinstance(value, int) and not isinstance(value, bool):
        return [] if abs(value) <= MAX_SAFE_INTEGER else [f"{where}={value}"]
    if isinstance(value, Decimal):
        return [] if Decimal(repr(float(value))) == value else [f"{where}={value}"]
    return []


def test_every_number_in_every_item_json_is_exact_as_an_ieee_double(output: Output):
    checked = 0
    for path in output.tars:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    text = tar.extractfile(member).read().decode("utf-8")
                    meta = json.loads(text, parse_float=Decimal)
                    assert _exact_numbers(meta, member.name) == []
                    assert "null" not in text.replace('"null"', ""), "no null values in the item JSON"
                    checked += 1
    assert checked == len(output.ok)


def test_old_json_readers_meet_no_integer_beyond_2_53_even_with_a_large_seed(outputs: dict[str, Output]):
    out = outputs["txt2img"]
    assert max(r["seed"] for r in out.ok) > MAX_SAFE_INTEGER, "the job's item seeds are uint64 beyond 2**53"
    with tarfile.open(out.tars[0]) as tar:
        name = next(m for m in tar.getnames() if m.endswith(".json"))
        meta = json.load(io.BytesIO(tar.extractfile(name).read()))
    assert isinstance(meta["seed"], str)
    assert pq.read_schema(out.root / "manifest" / "part-00000.parquet").field("seed").type == pa.uint64()
