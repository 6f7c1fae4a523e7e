"""Security: Redis AUTH and TLS end to end, no credential in any stored or returned text, pinned dependencies.

What is covered elsewhere, and not repeated here:

* only JSON is accepted by workers, a pickled message is refused, logged and
  never unpickled: tests/test_task_messages.py (behaviour, real worker); here
  only the configuration those tests rely on is pinned;
* no S3 credential or ``Signature=`` in any log line at DEBUG (case C7):
  tests/test_worker_faults.py.

Here: a Redis that requires a password (and one that speaks only TLS) runs a
job end to end; a wrong password fails with a clear message that shows no
password; and after a job with failures, no credential (S3 keys, session
token, Redis password) is found in the task messages, anything stored in
Redis (job records, failure reasons, results), any object or object metadata
in storage, any error message, or the worker's and the CLI's output.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import redis
from packaging.requirements import Requirement
from packaging.version import Version

from genimg.errors import QueueUnavailableError
from genimg.queue import priority_lists
from producer import Client
from tests.fixtures.redisserver import make_tls_files, redis_supports_tls
from tests.fixtures.workers import wait_for

REDIS_PASSWORD = "rp-Secr3t-genimg-5f1c"
WRONG_PASSWORD = "wp-Wr0ng-genimg-77aa"
S3_KEY_ID = "AKIAEXAMPLEKEY000002"
S3_SECRET = "SECRET-genimg-s3-9d2e41"
S3_TOKEN = "SESSION-TOKEN-genimg-3b7c"
SECRETS = (REDIS_PASSWORD, WRONG_PASSWORD, S3_KEY_ID, S3_SECRET, S3_TOKEN, "Signature=")

pytestmark = pytest.mark.slow


def _leaks(text: str | bytes) -> list[str]:
    """The secrets found in ``text``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return [s for s in SECRETS if s in text]


def _use_redis(stack, url: str) -> None:
    """Point the test's stack (its workers and the producer's environment) at ``url``."""
    stack.env["GENIMG_REDIS_URL"] = url
    os.environ["GENIMG_REDIS_URL"] = url


def _cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout_s)


@pytest.fixture
def auth_redis(make_redis_server):
    """A redis-server of the test's own with ``requirepass`` (set up before ``stack``, so torn down after it)."""
    return make_redis_server("redis-auth", password=REDIS_PASSWORD, appendonly=False)


# --------------------------------------------------------------------------- AUTH


def test_a_job_runs_end_to_end_on_a_redis_that_requires_a_password(auth_redis, stack, s3_bucket):
    with pytest.raises(redis.AuthenticationError):  # the server really requires the password
        redis.Redis(port=auth_redis.port, socket_timeout=5).ping()
    _use_redis(stack, auth_redis.url)
    worker = stack.start_worker()
    worker.wait_ready()
    with Client() as client:
        job = client.submit(count=6, model="noise2img", upscale=False, shard_size=3,
                            output=f"s3://{s3_bucket}/auth")
        status = job.wait(progress=False, timeout_s=180)
    assert status.state == "succeeded" and status.items_done == 6
    assert auth_redis.client().exists(f"{stack.env['GENIMG_KEY_PREFIX']}:job:{job.job_id}:summary")
    assert not _leaks(worker.log()), "the Redis password is in the worker's log"
    assert not _leaks(repr(client))


def test_a_wrong_redis_password_fails_with_a_clear_error_that_shows_no_password(auth_redis, stack, s3_bucket):
    wrong = auth_redis.url.replace(REDIS_PASSWORD, WRONG_PASSWORD)
    with Client(wrong) as client:
        with pytest.raises(QueueUnavailableError) as info:
            client.submit(count=2, model="noise2img", upscale=False, output=f"s3://{s3_bucket}/wrong")
    message = str(info.value)
    assert "AuthenticationError" in message and "GENIMG_REDIS_URL" in message, message
    assert not _leaks(message) and not _leaks(repr(info.value.__cause__)), message
    with Client(auth_redis.url) as client:  # nothing was stored or enqueued
        assert not [k for k in client.redis.scan_iter("*")]

    env = {"GENIMG_REDIS_URL": wrong}
    submitted = _cli("submit", "--count", "2", "--model", "noise2img", "--no-upscale", "--output",
                     f"s3://{s3_bucket}/wrong-cli", env=env)
    assert submitted.returncode == 3, submitted.stderr
    assert "AuthenticationError" in submitted.stderr and "GENIMG_REDIS_URL" in submitted.stderr
    assert not _leaks(submitted.stdout + submitted.stderr)

    check = _cli("worker", "--check", env=env)
    assert check.returncode == 1 and "AuthenticationError" in check.stderr, check.stderr
    assert not _leaks(check.stdout + check.stderr)

    _use_redis(stack, wrong)
    worker = stack.start_worker()
    wait_for(lambda: "invalid username-password pair" in worker.log(), 120,
             "the worker to log that Redis refused its password")
    worker.stop()
    _use_redis(stack, auth_redis.url)  # the stack's teardown cleans up with the right password
    assert not _leaks(worker.log()), "a password is in the worker's log"


# --------------------------------------------------------------------------- TLS


@pytest.mark.skipif(not redis_supports_tls(), reason="this redis-server was built without TLS "
                    "(docs/operations.md: Redis TLS)")
def test_a_job_runs_end_to_end_over_tls_with_a_rediss_url(make_redis_server, stack, s3_bucket, tmp_path: Path):
    tls = make_tls_files(tmp_path / "tls")
    server = make_redis_server("redis-tls", password=REDIS_PASSWORD, appendonly=False, tls=tls)
    with pytest.raises(redis.ConnectionError):  # no plain-text port: every client below speaks TLS
        redis.Redis(port=server.port, password=REDIS_PASSWORD, socket_timeout=5).ping()
    assert server.url.startswith("rediss://")
    _use_redis(stack, server.url)
    worker = stack.start_worker()
    worker.wait_ready()
    with Client() as client:
        job = client.submit(count=4, model="noise2img", upscale=False, shard_size=2,
                            output=f"s3://{s3_bucket}/tls")
        status = job.wait(progress=False, timeout_s=180)
    assert status.state == "succeeded" and status.items_done == 4
    check = _cli("worker", "--check")
    assert check.returncode == 0, check.stderr
    assert not _leaks(worker.log())


@pytest.mark.skipif(not redis_supports_tls(), reason="this redis-server was built without TLS "
                    "(docs/operations.md: Redis TLS)")
def test_a_rediss_url_without_the_ca_refuses_a_server_whose_certificate_it_cannot_verify(
        make_redis_server, tmp_path: Path):
    from genimg.spec import JobSpec

    server = make_redis_server("redis-tls", password=REDIS_PASSWORD, appendonly=False,
                               tls=make_tls_files(tmp_path / "tls"))
    bare = server.url.split("?")[0]  # rediss:// without ssl_ca_certs: the self-signed CA is unknown
    spec = JobSpec.create(model="noise2img", count=2, output="s3://any-bucket/run")
    with Client(bare) as client:
        with pytest.raises(QueueUnavailableError, match="(?i)certificate verify failed"):
            client.enqueue_shards(spec, [0])  # the broker connection (kombu) checks the certificate
        with pytest.raises(QueueUnavailableError, match="(?i)certificate verify failed"):
            client.job(spec.job_id).status()  # so does genimg's own Redis client (redis-py)


# --------------------------------------------------------------------------- no credential anywhere


def _redis_dump(r: redis.Redis) -> dict[str, bytes]:
    """Every key of the database and its value(s), as bytes."""
    out: dict[str, bytes] = {}
    for key in r.scan_iter("*", count=1000):
        kind = r.type(key).decode()
        if kind == "string":
            value = r.get(key) or b""
        elif kind == "hash":
            value = b"\n".join(k + b"=" + v for k, v in r.hgetall(key).items())
        elif kind == "list":
            value = b"\n".join(r.lrange(key, 0, -1))
        elif kind == "set":
            value = b"\n".join(sorted(r.smembers(key)))
        elif kind == "zset":
            value = b"\n".join(m for m, _ in r.zrange(key, 0, -1, withscores=True))
        else:
            value = kind.encode()
        out[key.decode(errors="replace")] = key + b"\n" + value
    return out


def _decoded_bodies(dump: dict[str, bytes]) -> list[bytes]:
    """Base64 message bodies inside kombu's messages (queues and the unacked hash), decoded."""
    bodies = []
    for value in dump.values():
        for line in value.split(b"\n"):
            start = line.find(b"{")
            if start < 0:
                continue
            try:
                doc = json.loads(line[start:])
            except ValueError:
                continue
            msg = doc[0] if isinstance(doc, list) and doc and isinstance(doc[0], dict) else doc
            if isinstance(msg, dict) and isinstance(msg.get("body"), str):
                try:
                    bodies.append(base64.b64decode(msg["body"]))
                except ValueError:
                    pass
    return bodies


def _bucket_texts(store) -> dict[str, bytes]:
    """Every object's bytes and user metadata; tar members one by one."""
    out: dict[str, bytes] = {}
    for key in store.list_keys(""):
        data = store.get_bytes(key)
        head = store.client.head_object(Bucket=store.bucket, Key=key)
        out[key] = data + json.dumps(head.get("Metadata", {})).encode()
        if key.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                for m in tf.getmembers():
                    out[f"{key}::{m.name}"] = tf.extractfile(m).read()  # type: ignore[union-attr]
    return out


def test_no_credential_appears_in_task_messages_redis_records_results_objects_metadata_or_errors(
        auth_redis, stack, s3_bucket, make_fault_proxy, moto_s3_endpoint, make_s3_store):
    proxy = make_fault_proxy(moto_s3_endpoint)
    # Shard 1: the store answers like AWS when a signature is wrong, echoing the key id and the
    # canonical request (with the session token) in extra XML elements. Shard 2: 503 until retries run out.
    echo = (f"The request signature we calculated does not match the signature you provided.</Message>"
            f"<AWSAccessKeyId>{S3_KEY_ID}</AWSAccessKeyId><StringToSign>AWS4-HMAC-SHA256</StringToSign>"
            f"<CanonicalRequest>PUT x-amz-security-token:{S3_TOKEN}</CanonicalRequest><Message>")
    proxy.fail(None, status=403, code="SignatureDoesNotMatch", message=echo,
               match=lambda q: q.method == "PUT" and q.path.split("?")[0].endswith("/shards/000001.tar"))
    proxy.fail(None, match=lambda q: q.method == "PUT" and q.path.split("?")[0].endswith("/shards/000002.tar"))
    creds = {"GENIMG_S3_ACCESS_KEY_ID": S3_KEY_ID, "GENIMG_S3_SECRET_ACCESS_KEY": S3_SECRET,
             "GENIMG_S3_SESSION_TOKEN": S3_TOKEN, "GENIMG_S3_ENDPOINT_URL": proxy.endpoint_url,
             "GENIMG_S3_MAX_ATTEMPTS": "2", "GENIMG_RETRY_BUDGET_S": "1"}
    stack.env.update(creds)
    os.environ.update(creds)
    _use_redis(stack, auth_redis.url)
    r = auth_redis.client()

    with Client() as client:
        job = client.submit(count=8, model="noise2img", upscale=False, shard_size=2,
                            output=f"s3://{s3_bucket}/creds", name="no-secrets")
        queued = {k: v for k, v in _redis_dump(r).items() if any(k.startswith(n) for n in
                                                                  priority_lists(stack.env["GENIMG_QUEUE"]))}
        messages = [json.loads(raw) for name in priority_lists(stack.env["GENIMG_QUEUE"])
                    for raw in r.lrange(name, 0, -1)]
        assert len(messages) == 4
        for m in messages:  # the task's arguments: the job id and the shard, nothing else
            body = json.loads(base64.b64decode(m["body"]))
            assert body[0][0] == job.job_id and isinstance(body[0][1], int) and body[1] == {}
        assert not _leaks(b"".join(queued.values()) + b"".join(_decoded_bodies(queued)))

        worker = stack.start_worker()
        worker.wait_ready()
        status = job.wait(progress=False, timeout_s=240)
        assert status.state == "failed" and status.shards_failed == 2 and status.items_done == 4, status
        shown = _cli("status", job.job_id, "--json")
    assert shown.returncode == 0, shown.stderr

    dump = _redis_dump(r)
    failed = r.hgetall(f"{stack.env['GENIMG_KEY_PREFIX']}:job:{job.job_id}:failed")
    reasons = b"\n".join(failed.values()).decode()
    assert "SignatureDoesNotMatch" in reasons and "retries_exhausted" in reasons, reasons  # errors were stored
    found = {k: _leaks(v) for k, v in dump.items() if _leaks(v)}
    found.update({f"body in {i}": _leaks(b) for i, b in enumerate(_decoded_bodies(dump)) if _leaks(b)})
    assert not found, f"credentials in Redis: {found}"

    store = make_s3_store()  # moto directly, test credentials
    texts = _bucket_texts(store)
    assert any(k.endswith("_SUCCESS") for k in texts) and any("::" in k for k in texts)
    found = {k: _leaks(v) for k, v in texts.items() if _leaks(v)}
    assert not found, f"credentials in stored objects or their metadata: {found}"

    assert not _leaks(shown.stdout + shown.stderr)
    assert "SignatureDoesNotMatch" in worker.log()
    assert not _leaks(worker.log()), [line for line in worker.log().splitlines() if _leaks(line)][:3]


# --------------------------------------------------------------------------- configuration and versions


def test_workers_and_producer_accept_and_send_only_json():
    """The configuration behind tests/test_task_messages.py (which proves a pickled message is refused)."""
    from genimg.settings import WorkerSettings
    from genimg.queue import celery_config

    config = celery_config(WorkerSettings())
    assert config["accept_content"] == ["json"] and config["result_accept_content"] == ["json"]
    assert config["task_serializer"] == config["result_serializer"] == config["event_serializer"] == "json"


PINNED_FOR_FAULTS = {
    "kombu": ("5.4", "consumers no longer stuck after a Redis restart"),
    "celery": ("5.4", "prefork workers reconnect after a broker restart"),
    "redis": ("5.0.4", "health checks and retry on timeout for broker connections"),
    "botocore": ("1.35", "request_checksum_calculation=when_required for non-AWS S3 (case C6)"),
}


def _pyproject_requirements() -> dict[str, Requirement]:
    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in data["project"]["dependencies"]]
    return {r.name.lower(): r for r in reqs}


def test_installed_queue_and_storage_libraries_satisfy_the_pins_for_the_faults_this_suite_injects():
    reqs = _pyproject_requirements()
    for name in ("celery", "kombu", "redis", "boto3"):
        installed = version(name)
        assert reqs[name].specifier.contains(installed, prereleases=True), \
            f"{name} {installed} does not satisfy pyproject's {reqs[name]}"
    for name, (minimum, why) in PINNED_FOR_FAULTS.items():
        assert Version(version(name)) >= Version(minimum), f"{name} < {minimum}: {why}"
    # celery 5.7.0 lets an AttributeError escape its reconnect path when Redis goes away while
    # the worker holds unacknowledged messages: the worker exits (seen in tests/chaos).
    assert Version(version("celery")) < Version("5.7"), "celery 5.7.x: see pyproject.toml"
    assert not reqs["celery"].specifier.contains("5.7.0"), "pyproject must keep excluding celery 5.7.0"
