"""S3Store against a real S3 API (moto's standalone server), with and without injected faults."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from genimg.errors import (
    ConfigError,
    PayloadTooLargeError,
    StorageError,
    StorageNotFoundError,
    StorageUnavailableError,
    ValidationError,
)
from genimg.redaction import REDACTION
from genimg.stores.s3 import S3Store
from genimg.stores.base import sha256_hex
from genimg.urls import parse_s3_url as parse_url
from tests.fixtures.faultproxy import RecordedRequest
from tests.fixtures.s3 import free_port

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


def _payload(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


# --------------------------------------------------------------------------- URLs


def test_parse_url_splits_bucket_and_prefix_and_strips_slashes():
    assert parse_url("s3://my-bucket/a/b/") == ("my-bucket", "a/b")
    assert parse_url("s3://my-bucket") == ("my-bucket", "")


@pytest.mark.parametrize(
    "url", ["http://b/x", "s3://Bad_Bucket/x", "s3://ab/x", "s3://bucket/a/../b", "s3://bucket/a//b", "s3://b\n/x"]
)
def test_parse_url_rejects_non_s3_urls_bad_buckets_and_traversal(url):
    with pytest.raises(ValidationError):
        parse_url(url)


# --------------------------------------------------------------------------- C6: any S3 API


def test_put_then_get_round_trips_and_records_sha256_metadata_equal_to_downloaded_bytes(s3_store):
    data = _payload(10_000)
    result = s3_store.put_bytes("a/b/obj.bin", data, "application/x-test")
    got = s3_store.get_bytes("a/b/obj.bin", verify_sha256=True)
    info = s3_store.head("a/b/obj.bin")
    assert got == data
    assert not result.multipart
    assert result.sha256 == info.sha256 == hashlib.sha256(got).hexdigest()
    assert info.size_bytes == len(data)
    assert info.content_type == "application/x-test"


def test_upload_above_threshold_is_multipart_and_sha256_metadata_matches_downloaded_bytes(make_s3_store):
    store = make_s3_store(s3_multipart_threshold_bytes=5 * MiB, s3_multipart_chunk_bytes=5 * MiB)
    data = _payload(6 * MiB + 123, seed=1)
    result = store.put_bytes("big/shard.tar", data, "application/x-tar")
    got = store.get_bytes("big/shard.tar")
    info = store.head("big/shard.tar")
    assert result.multipart
    assert got == data
    assert info.sha256 == sha256_hex(got) == result.sha256
    # A multipart ETag is "<md5 of part md5s>-<parts>", not the object's MD5: never use it for integrity.
    assert info.etag.strip('"').endswith("-2")
    assert store.list_multipart_uploads("big/") == []


def test_requests_carry_no_flexible_checksums_and_batch_delete_sends_content_md5(make_s3_store, fault_proxy, s3_bucket):
    store = make_s3_store(
        endpoint_url=fault_proxy.endpoint_url, s3_multipart_threshold_bytes=5 * MiB, s3_multipart_chunk_bytes=5 * MiB
    )
    store.put_bytes("p/small", b"x" * 100)
    store.put_bytes("p/large", _payload(5 * MiB + 1))
    assert store.delete_prefix("p/") == 2
    assert store.list_keys("p/") == []

    sent = fault_proxy.requests
    for req in sent:
        assert not [h for h in req.headers if h.startswith("x-amz-checksum-")], req
        assert "x-amz-sdk-checksum-algorithm" not in req.headers, req
        assert "x-amz-trailer" not in req.headers, req
        assert "aws-chunked" not in req.headers.get("content-encoding", ""), req
        assert req.path.startswith(f"/{s3_bucket}"), "path-style addressing"
        assert req.headers["host"] == fault_proxy.endpoint_url.removeprefix("http://")
    deletes = [r for r in sent if r.method == "POST" and "delete" in r.path.split("?", 1)[-1]]
    assert len(deletes) == 1
    expected_md5 = base64.b64encode(hashlib.md5(deletes[0].body).digest()).decode()
    assert deletes[0].headers["content-md5"] == expected_md5
    assert any("uploadId=" in r.path for r in sent if r.method == "PUT"), "the large object went multipart"


def test_delete_prefix_removes_more_than_one_batch_and_leaves_other_prefixes(s3_store, monkeypatch):
    monkeypatch.setattr("genimg.stores.s3.DELETE_BATCH_SIZE", 7)
    for i in range(20):
        s3_store.put_bytes(f"gone/{i:03d}", b"%d" % i)
    s3_store.put_bytes("kept/one", b"1")
    assert s3_store.delete_prefix("gone/") == 20
    assert s3_store.list_keys("") == ["kept/one"]


def test_list_keys_pages_through_more_than_one_page(s3_store):
    keys = [f"many/{i:04d}" for i in range(25)]
    for key in keys:
        s3_store.put_bytes(key, b"")
    assert s3_store.list_keys("many/", page_size=10) == keys


def test_delete_prefix_refuses_an_empty_prefix_without_everything(s3_store):
    with pytest.raises(ValidationError):
        s3_store.delete_prefix("")


def test_missing_key_is_storage_not_found_for_get_head_and_range(s3_store):
    with pytest.raises(StorageNotFoundError):
        s3_store.get_bytes("nope")
    with pytest.raises(StorageNotFoundError):
        s3_store.head("nope")
    with pytest.raises(StorageNotFoundError):
        s3_store.get_range("nope", 0, 1)
    assert s3_store.exists("nope") is False


def test_missing_bucket_is_storage_not_found(make_s3_store):
    store = make_s3_store(bucket="genimg-no-such-bucket")
    with pytest.raises(StorageNotFoundError):
        store.put_bytes("k", b"v")


def test_get_range_reads_exact_bytes_and_rejects_a_range_past_the_end(s3_store):
    data = bytes(range(256))
    s3_store.put_bytes("r", data)
    assert s3_store.get_range("r", 10, 5) == data[10:15]
    assert s3_store.get_range("r", 0, 0) == b""
    with pytest.raises(StorageError):
        s3_store.get_range("r", 250, 10)


def test_get_bytes_refuses_objects_above_max_bytes(s3_store):
    s3_store.put_bytes("k", b"0123456789")
    with pytest.raises(PayloadTooLargeError):
        s3_store.get_bytes("k", max_bytes=9)
    assert s3_store.get_bytes("k", max_bytes=10) == b"0123456789"


def test_ensure_bucket_is_idempotent(s3_store):
    s3_store.ensure_bucket()
    s3_store.ensure_bucket()


def test_abort_multipart_uploads_removes_abandoned_uploads_under_the_prefix_only(s3_store):
    c = s3_store.client
    c.create_multipart_upload(Bucket=s3_store.bucket, Key="job/shards/000001.tar")
    c.create_multipart_upload(Bucket=s3_store.bucket, Key="other/x")
    assert [u.key for u in s3_store.list_multipart_uploads("job/")] == ["job/shards/000001.tar"]
    # moto reports a fixed 2010 initiation time, so "newer than the cutoff" needs a cutoff before 2010.
    century_s = 100 * 365 * 24 * 3600.0
    assert s3_store.abort_multipart_uploads("job/", older_than_s=century_s) == 0, "newer uploads are spared"
    assert s3_store.abort_multipart_uploads("job/") == 1
    assert s3_store.list_multipart_uploads("job/") == []
    assert len(s3_store.list_multipart_uploads("")) == 1


# --------------------------------------------------------------------------- faults: retries and error mapping


def _is_put(req: RecordedRequest) -> bool:
    return req.method == "PUT"


def test_slowdown_on_the_first_two_requests_is_retried_and_the_upload_succeeds(make_s3_store, fault_proxy):
    rule = fault_proxy.fail(times=2, status=503, code="SlowDown", match=_is_put)
    store = make_s3_store(endpoint_url=fault_proxy.endpoint_url, s3_max_attempts=3)
    store.put_bytes("retried", b"payload")
    assert rule.fired == 2
    assert store.get_bytes("retried") == b"payload"
    assert [r.faulted for r in fault_proxy.requests if r.method == "PUT"] == [True, True, False]


def test_persistent_slowdown_becomes_storage_unavailable_after_max_attempts(make_s3_store, fault_proxy):
    fault_proxy.fail(times=None, status=503, code="SlowDown")
    store = make_s3_store(endpoint_url=fault_proxy.endpoint_url, s3_max_attempts=2)
    with pytest.raises(StorageUnavailableError) as info:
        store.put_bytes("never", b"payload")
    assert "SlowDown" in str(info.value)
    assert info.value.__cause__ is not None
    assert len(fault_proxy.requests) == 2


def test_persistent_500_on_a_multipart_part_becomes_storage_unavailable(make_s3_store, fault_proxy):
    fault_proxy.fail(times=None, status=500, code="InternalError", match=lambda r: "partNumber=" in r.path)
    store = make_s3_store(
        endpoint_url=fault_proxy.endpoint_url,
        s3_max_attempts=2,
        s3_multipart_threshold_bytes=5 * MiB,
        s3_multipart_chunk_bytes=5 * MiB,
    )
    with pytest.raises(StorageUnavailableError):
        store.put_bytes("big", _payload(5 * MiB + 10))
    assert not store.exists("big")
    assert store.list_multipart_uploads("big") == [], "the failed upload was aborted"


def test_connection_resets_are_retried_then_become_storage_unavailable(make_s3_store, fault_proxy):
    fault_proxy.fail(times=1, action="reset")
    store = make_s3_store(endpoint_url=fault_proxy.endpoint_url, s3_max_attempts=2)
    store.put_bytes("after-reset", b"ok")
    assert store.get_bytes("after-reset") == b"ok"

    fault_proxy.fail(times=None, action="reset")
    with pytest.raises(StorageUnavailableError):
        store.get_bytes("after-reset")


def test_unreachable_endpoint_is_storage_unavailable(make_s3_store):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = make_s3_store(endpoint_url=url, s3_max_attempts=1, s3_connect_timeout_s=2.0)
    with pytest.raises(StorageUnavailableError):
        store.put_bytes("k", b"v")


def test_access_denied_is_a_plain_storage_error_not_retryable(make_s3_store, fault_proxy):
    fault_proxy.fail(times=None, status=403, code="AccessDenied", message="Access Denied")
    store = make_s3_store(endpoint_url=fault_proxy.endpoint_url)
    with pytest.raises(StorageError) as info:
        store.put_bytes("k", b"v")
    assert type(info.value) is StorageError
    assert len(fault_proxy.requests) == 1, "a 403 is not retried"


# --------------------------------------------------------------------------- credentials and C7


def test_credentials_come_from_a_mounted_ini_file(make_s3_store, tmp_path: Path):
    creds = tmp_path / "credentials"
    creds.write_text("[genimg]\naws_access_key_id = FILEKEY0000000000001\naws_secret_access_key = file-secret\n")
    store = make_s3_store(
        s3_access_key_id=None, s3_secret_access_key=None, s3_credentials_file=creds, s3_credentials_profile="genimg"
    )
    frozen = store.client._request_signer._credentials.get_frozen_credentials()
    assert frozen.access_key == "FILEKEY0000000000001"
    store.put_bytes("k", b"v")


def test_credentials_file_without_the_profile_is_a_config_error(make_s3_store, tmp_path: Path):
    creds = tmp_path / "credentials"
    creds.write_text("[other]\naws_access_key_id = X\naws_secret_access_key = Y\n")
    with pytest.raises(ConfigError):
        make_s3_store(s3_access_key_id=None, s3_secret_access_key=None, s3_credentials_file=creds)


def test_only_one_of_key_id_and_secret_is_a_config_error(make_s3_store):
    with pytest.raises(ConfigError):
        make_s3_store(s3_secret_access_key=None)


FAKE_KEY_ID = "AKIAEXAMPLEKEY000001"
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
FAKE_TOKEN = "SESSION-TOKEN-XYZ"


@pytest.mark.parametrize("source", ["genimg-settings", "aws-environment"])
def test_no_secret_or_signature_appears_in_debug_logs_of_an_upload(
    source, make_s3_store: Callable[..., S3Store], monkeypatch, caplog
):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    caplog.set_level(logging.DEBUG)
    try:
        if source == "genimg-settings":
            store = make_s3_store(
                s3_access_key_id=FAKE_KEY_ID, s3_secret_access_key=FAKE_SECRET, s3_session_token=FAKE_TOKEN
            )
        else:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
            monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE_TOKEN)
            store = make_s3_store(s3_access_key_id=None, s3_secret_access_key=None)
        store.put_bytes("secret-test/obj", b"payload")
        assert store.get_bytes("secret-test/obj") == b"payload"
        store.delete_prefix("secret-test/")
        with pytest.raises(StorageNotFoundError):
            store.get_bytes("secret-test/obj")
    finally:
        root.removeHandler(handler)

    outputs = {"caplog": caplog.text, "stream": stream.getvalue()}
    # The test means something only if botocore really logged requests and signing at DEBUG.
    assert "Sending http request" in outputs["stream"]
    assert "CanonicalRequest" in outputs["stream"]
    for where, text in outputs.items():
        for needle in (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN, "Signature="):
            assert needle not in text, f"{needle!r} leaked into {where} logs"
    assert "<redacted" in outputs["stream"]


def test_redaction_filter_removes_presigned_url_and_header_secrets():
    text = (
        "GET /b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX%2F20250101&X-Amz-Signature=abc123"
        "&X-Amz-Security-Token=TOKENVALUE {'x-amz-security-token': b'TOKENVALUE', "
        "'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIAX/20250101/us-east-1/s3/aws4_request, "
        "SignedHeaders=host, Signature=deadbeef'} aws_secret_access_key=SECRETVALUE"
    )
    out = REDACTION.redact(text)
    for needle in ("Signature=", "TOKENVALUE", "AKIAX", "deadbeef", "SECRETVALUE", "abc123"):
        assert needle not in out, (needle, out)


# --------------------------------------------------------------------------- throttle and retry metrics


def _samples(name: str) -> dict[tuple[str, str], float]:
    from prometheus_client import REGISTRY

    out: dict[tuple[str, str], float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name:
                out[(sample.labels["operation"], sample.labels["code"])] = sample.value
    return out


def _delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def test_throttle_metric_equals_the_503s_the_proxy_served_by_operation_and_code(make_s3_store, fault_proxy):
    """Every 503 SlowDown is counted once (retried attempts and the final, un-retried one alike), under the
    operation it hit; each retried failure (503s and connection resets) once in the retry counter."""
    import random

    rng = random.Random(16)
    slow = fault_proxy.fail(None, match=lambda q: rng.random() < 0.3)
    reset = fault_proxy.fail(2, action="reset", match=lambda q: q.method == "GET")
    store = make_s3_store(endpoint_url=fault_proxy.endpoint_url, s3_max_attempts=4,
                          s3_multipart_threshold_bytes=5 * MiB, s3_multipart_chunk_bytes=5 * MiB)
    throttled0, retries0 = _samples("genimg_s3_throttled_total"), _samples("genimg_s3_retries_total")
    failures = 0
    for i in range(8):
        try:
            store.put_bytes(f"t/{i}", b"x" * 100)
            store.get_bytes(f"t/{i}")
            store.exists(f"t/{i}")
        except StorageUnavailableError:
            failures += 1  # four 503s in a row: counted all the same
    store.put_bytes("t/big", _payload(5 * MiB + 1))  # CreateMultipartUpload, UploadPart ×2, Complete…
    throttled = _delta(_samples("genimg_s3_throttled_total"), throttled0)
    retries = _delta(_samples("genimg_s3_retries_total"), retries0)

    assert slow.fired > 5 and reset.fired == 2
    assert sum(throttled.values()) == slow.fired, (throttled, slow.fired, failures)
    assert {code for _, code in throttled} <= {"SlowDown", "503"}  # HEAD answers carry no body, so no code
    assert {op for op, _ in throttled} <= {"PutObject", "GetObject", "HeadObject", "CreateMultipartUpload",
                                            "UploadPart", "CompleteMultipartUpload"}
    # Retried: every fault but the last attempt of each request that failed after 4 attempts.
    assert sum(retries.values()) == slow.fired + reset.fired - failures, (retries, failures)
    assert sum(v for (_, code), v in retries.items() if code not in ("SlowDown", "503")) == reset.fired


def test_the_connection_pool_fits_every_caller_and_its_part_uploads(make_s3_store, caplog):
    from genimg.stores.s3_client import pool_size
    from tests.fixtures.s3 import storage_settings_for

    settings = storage_settings_for("http://127.0.0.1:1", s3_transfer_max_concurrency=4)
    assert pool_size(settings, callers=8) == (8 * 4 + 2, 4)
    explicit = storage_settings_for("http://127.0.0.1:1", s3_transfer_max_concurrency=4, s3_max_pool_connections=10)
    assert pool_size(explicit, callers=4) == (10, 2)  # the part concurrency is lowered to fit

    from concurrent.futures import ThreadPoolExecutor

    from genimg.stores.s3 import S3Store as Store

    base = make_s3_store()
    store = Store(base.settings, base.bucket, callers=24)  # more threads than the old fixed pool of 16
    assert store.client.meta.config.max_pool_connections == 24 * 4 + 2
    caplog.set_level(logging.WARNING, logger="urllib3.connectionpool")
    with ThreadPoolExecutor(24) as pool:
        list(pool.map(lambda i: store.put_bytes(f"pool/{i}", b"y" * 1000), range(96)))
    store.close()
    assert "Connection pool is full" not in caplog.text


def test_job_stores_of_one_bucket_share_one_client_and_keep_each_url_prefix(s3_settings, s3_bucket):
    from genimg.stores import open_job_store

    cache: dict = {}
    job = "0123456789abcdef0123456789abcdef"
    a, la = open_job_store(f"s3://{s3_bucket}/runs/a", job, s3_settings, cache=cache)
    b, lb = open_job_store(f"s3://{s3_bucket}/runs/b/", job, s3_settings, cache=cache)
    c, lc = open_job_store(f"s3://{s3_bucket}", job, s3_settings, cache=cache)
    other, lo = open_job_store("s3://another-bucket/runs/a", job, s3_settings, cache=cache)
    try:
        assert a is b is c and other is not a
        assert (la.prefix, lb.prefix, lc.prefix, lo.prefix) == ("runs/a", "runs/b", "", "runs/a")
        assert (la.bucket, lo.bucket) == (s3_bucket, "another-bucket")
        assert sorted(cache) == sorted([f"s3://{s3_bucket}", "s3://another-bucket"])
    finally:
        for store, _ in cache.values():
            store.close()
