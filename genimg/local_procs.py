"""The local stack's processes: start one in its own session with its log, know it across pid reuse, stop its whole
process group, and poll a component until it answers (:mod:`genimg.local` runs the stack with them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from genimg.errors import GenImgError

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0
"""Seconds a stopped process has after SIGTERM before its group is killed (workers get longer, see genimg.local)."""
POLL_S = 0.2
"""Seconds between two checks while waiting for a process."""


class LocalStackError(GenImgError):
    """A component of the local stack did not start, or the state directory is unusable."""


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state first), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (identifies it across pid reuse)."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields and fields[0] != "Z" and int(fields[2]) == pgid:
                out.append(int(entry.name))
    return sorted(out)


@dataclasses.dataclass
class Proc:
    """One process the stack started: a session (process group) leader.

    Attributes:
        name: ``redis``, ``s3``, ``triton``, ``tritonserver`` or ``worker-N``.
        pid: its pid, also its process group id.
        ticks: kernel start time, so a recycled pid is not taken for this process.
        log: file holding its stdout and stderr.
        port: the port it serves on, if one.
    """

    name: str
    pid: int
    ticks: int | None
    log: str
    port: int | None = None

    def alive(self) -> bool:
        """Whether this very process still runs (not a zombie, not a recycled pid)."""
        fields = _proc_stat(self.pid)
        if not fields or fields[0] == "Z":
            return False
        return self.ticks is None or int(fields[19]) == self.ticks

    def group(self) -> list[int]:
        """Live members of its process group (empty once all are gone).

        Linux never hands out a pid that is still some group's id, so while any
        member lives the group is this leader's; a live process with this pid
        but another start time means the group is gone and the pid recycled.
        """
        fields = _proc_stat(self.pid)
        if fields and fields[0] != "Z" and self.ticks is not None and int(fields[19]) != self.ticks:
            return []
        return group_members(self.pid)

    def log_tail(self, n_bytes: int = 3000) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - n_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


def spawn(name: str, cmd: list[str], log_path: Path, env: dict[str, str], port: int | None = None,
           popens: dict[int, subprocess.Popen[bytes]] | None = None) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as f:
        f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             start_new_session=True, close_fds=True)
    if popens is not None:
        popens[p.pid] = p
    return Proc(name=name, pid=p.pid, ticks=start_ticks(p.pid), log=str(log_path), port=port)


def _wait_gone(proc: Proc, timeout_s: float, popens: dict[int, subprocess.Popen[bytes]]) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        p = popens.get(proc.pid)
        if p is not None:
            p.poll()  # reap our own child so it does not linger as a zombie
        if not proc.alive():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)


def stop_proc(proc: Proc, timeout_s: float = STOP_TIMEOUT_S,
              popens: dict[int, subprocess.Popen[bytes]] | None = None) -> None:
    """SIGTERM the leader, wait up to ``timeout_s``, then SIGKILL every member left in its group."""
    popens = popens if popens is not None else {}
    if proc.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        if not _wait_gone(proc, timeout_s, popens):
            log.warning("%s (pid %d) did not exit within %g s after SIGTERM; killing its process group",
                        proc.name, proc.pid, timeout_s)
    left = proc.group()
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(proc, 10.0, popens)
    deadline = time.monotonic() + 10.0
    while group_members(proc.pid) and left and time.monotonic() < deadline:
        time.sleep(POLL_S)


# --------------------------------------------------------------------------- probes


def redis_answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the Redis server at ``url`` answers PING."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def http_answers(url: str, path: str = "/", timeout_s: float = 2.0) -> bool:
    """Whether an HTTP server at ``url`` (``http://host:port``) answers ``GET path`` at all."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def triton_ready(url: str, protocol: str = "grpc", timeout_s: float = 3.0) -> bool:
    """Whether Triton at ``url`` has every profile's model ready (``GENIMG_PROFILES_DIR``)."""
    from genimg.profiles import load_profiles
    from genimg.triton.client import InferenceClient

    try:
        with InferenceClient(url, protocol, timeout_s=timeout_s) as client:
            client.wait_ready(load_profiles().triton_models(), timeout_s=timeout_s)
        return True
    except GenImgError:
        return False


def poll(what: str, check: Callable[[], Any], timeout_s: float, proc: Proc | None = None) -> Any:
    """Call ``check`` until it returns a truthy value; raise LocalStackError on timeout or if ``proc`` dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if proc is not None and not proc.alive():
            raise LocalStackError(f"{what}: {proc.name} (pid {proc.pid}) exited; log {proc.log}:\n"
                                  f"{proc.log_tail()}")
        if time.monotonic() > deadline:
            where = f"; log {proc.log}:\n{proc.log_tail()}" if proc is not None else ""
            raise LocalStackError(f"{what}: not ready within {timeout_s:g} s{where}")
        time.sleep(POLL_S)
