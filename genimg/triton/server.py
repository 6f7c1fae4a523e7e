"""Run the real ``tritonserver`` that the ``nvidia-pytriton`` wheel ships, on a machine without a GPU.

:class:`TritonServer` starts the wheel's binary (``pytriton/tritonserver/bin``)
on a model repository with the wheel's Python backend, waits until every model
is READY, and stops it cleanly. What it arranges, and why:

* **Backend directory.** A private copy of the wheel's ``backends/python``
  with the Python-backend stub built for the running interpreter
  (``python_backend_stubs/<major>.<minor>/triton_python_backend_stub``); the
  wheel ships stubs for 3.8–3.13, and Triton looks for the stub next to
  ``libtriton_python.so``.
* **Library path.** ``LD_LIBRARY_PATH`` starts with the interpreter's own
  ``LIBDIR`` (``sysconfig``) and the wheel's ``nvidia_pytriton.libs``. The stub
  links ``libpython3.X.so.1.0``; if another build of it comes first (e.g.
  Debian's ``/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0``, 3.11.2, when
  the interpreter is pyenv's 3.11.7), the stub runs that C core with this
  environment's standard library, and code such as
  ``multiprocessing.shared_memory`` fails with ``'_thread.RLock' object has no
  attribute '_recursion_count'`` (plain models may still load: the fault is latent).
* **Which environment.** The stub's embedded interpreter ignores
  ``PYTHONPATH`` and ``PYTHONHOME`` (``sys.flags.ignore_environment`` is 1)
  and finds its prefix by looking up ``python3`` on ``PATH``, as a shell
  would; from a venv's ``bin/python3`` it reads ``pyvenv.cfg`` and gets that
  venv's site-packages (numpy, onnxruntime, tokenizers, ``.pth`` files). So
  ``PATH`` starts with the running interpreter's own directory, whether or
  not the venv is activated. The wheel declares ``numpy<2``.
* **Shutdown.** On SIGTERM Triton waits for open HTTP connections, in-flight
  requests and model unloading, all within ``--exit-timeout-secs`` (default
  30 s). A client that keeps its connection open uses the whole budget, and
  Triton then exits with code 1 without unloading the Python models (their
  stubs and shared memory are left behind). Clients should close; the server runs in its
  own session (process group) so :meth:`TritonServer.stop` can end it and its
  stub processes together; it removes the Python backend's shared-memory
  regions (``/dev/shm/<prefix>*``, a prefix unique to this server) if Triton
  left any. On Linux the server also gets SIGTERM when the thread that started
  it exits (``PR_SET_PDEATHSIG``), so a killed test run leaves no server behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from genimg.errors import ConfigError, InferenceUnavailableError, ModelError

log = logging.getLogger(__name__)

DEFAULT_EXIT_TIMEOUT_S = 5
"""Seconds Triton waits for in-flight requests after SIGTERM before unloading models."""
STARTUP_TIMEOUT_S = 180.0
"""Default seconds :meth:`TritonServer.wait_ready` waits for every model to be READY."""
_POLL_S = 0.2


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; another process may take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pytriton_dir() -> Path:
    """``pytriton/tritonserver`` inside the installed ``nvidia-pytriton`` wheel.

    Raises:
        ConfigError: the wheel (``pip install 'genimg[serve]'``) is not installed.
    """
    try:
        import pytriton
    except ImportError as e:
        raise ConfigError("tritonserver needs nvidia-pytriton: pip install 'genimg[serve]'") from e
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def stub_path(version: str | None = None) -> Path:
    """The wheel's Python-backend stub for ``version`` (default: the running interpreter's ``X.Y``).

    Raises:
        ConfigError: the wheel has no stub for that Python version.
    """
    version = version or f"{sys.version_info[0]}.{sys.version_info[1]}"
    path = pytriton_dir() / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not path.is_file():
        raise ConfigError(f"nvidia-pytriton ships no Python-backend stub for Python {version} ({path})")
    return path


def python_libdir() -> Path | None:
    """Directory holding the running interpreter's shared ``libpython`` (``sysconfig`` LIBDIR), if it has one."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        return Path(libdir)
    return None


def interpreter_bin_dir() -> Path:
    """Directory of the running interpreter as invoked (a venv's ``bin``, symlinks not resolved).

    Raises:
        ConfigError: it holds no ``python3``, so the stub could not find this environment.
    """
    bindir = Path(sys.executable).parent
    if not (bindir / "python3").exists():
        raise ConfigError(f"{bindir} has no python3; the Python-backend stub finds its environment by running "
                          "`python3` from PATH, so run genimg with an interpreter whose directory has one")
    return bindir


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ``tritonserver`` and its stubs (the module docstring explains each entry).

    ``PATH`` starts with :func:`interpreter_bin_dir` and ``LD_LIBRARY_PATH`` with the
    interpreter's ``LIBDIR`` and the wheel's ``nvidia_pytriton.libs``; ``PYTHONPATH`` and
    ``PYTHONHOME`` are dropped because the stub ignores them anyway.
    """
    env = dict(os.environ if base is None else base)
    if python_libdir() is None:
        log.warning("this Python has no shared libpython (built without --enable-shared); the Python-backend "
                    "stub will load whichever libpython%d.%d the system has", *sys.version_info[:2])
    libs = [str(p) for p in (python_libdir(), pytriton_dir().parent.parent / "nvidia_pytriton.libs") if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    env["PATH"] = os.pathsep.join([str(interpreter_bin_dir()), *path])
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    return env


def prepare_backends(dest: Path) -> Path:
    """Copy the wheel's Python backend and this interpreter's stub into ``dest/python``; returns ``dest``."""
    py = dest / "python"
    py.mkdir(parents=True, exist_ok=True)
    src = pytriton_dir() / "backends" / "python"
    files = {py / "libtriton_python.so": src / "libtriton_python.so",
             py / "triton_python_backend_utils.py": src / "triton_python_backend_utils.py",
             py / "triton_python_backend_stub": stub_path()}
    for dst, origin in files.items():
        if not dst.exists() or dst.stat().st_size != origin.stat().st_size:
            shutil.copy2(origin, dst)
    return dest


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonServer:
    """A local ``tritonserver`` process on a model repository.

    Example::

        with TritonServer("model_repository") as server:   # starts and waits until READY
            client = InferenceClient(server.urls["grpc"])

    Args:
        repo: model repository directory (e.g. from :func:`genimg.triton.repo.build_repository`).
        http_port, grpc_port, metrics_port: ports; 0 picks a free one.
        host: address to listen on (``127.0.0.1``; ``0.0.0.0`` for every interface).
        exit_timeout_s: Triton's ``--exit-timeout-secs``.
        log_verbose: Triton's ``--log-verbose`` level.
        work_dir: where the backend copy and ``triton.log`` go; default a new temp dir, removed on stop.
        extra_args: more ``tritonserver`` arguments.
        kill_with_parent: ask Linux to SIGTERM the server when the starting thread exits.
    """

    def __init__(self, repo: str | os.PathLike[str], *, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 host: str = "127.0.0.1", exit_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S, log_verbose: int = 0,
                 work_dir: str | os.PathLike[str] | None = None, extra_args: tuple[str, ...] = (),
                 kill_with_parent: bool = True) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ConfigError(f"model repository {self.repo} does not exist")
        self.host = host
        self._ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.exit_timeout_s = exit_timeout_s
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.kill_with_parent = kill_with_parent
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else None
        self.shm_prefix = f"genimg_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> TritonServer:
        """Start ``tritonserver`` (does not wait for readiness; see :meth:`wait_ready`).

        Raises:
            ConfigError: the wheel, its binary or the stub for this Python is missing.
        """
        if self.process is not None:
            raise ConfigError("server already started")
        binary = pytriton_dir() / "bin" / "tritonserver"
        if not binary.is_file():
            raise ConfigError(f"no tritonserver binary at {binary}")
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="genimg-triton-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        backends = prepare_backends(self.work_dir / "backends")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        self.ports = {k: v or free_port(host) for k, v in self._ports.items()}
        cmd = [
            str(binary), f"--model-repository={self.repo}", f"--backend-directory={backends}",
            f"--cache-directory={pytriton_dir() / 'caches'}",
            f"--http-address={self.host}", f"--http-port={self.ports['http']}",
            f"--grpc-address={self.host}", f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.host}", f"--metrics-port={self.ports['metrics']}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            f"--exit-timeout-secs={self.exit_timeout_s}", f"--log-verbose={self.log_verbose}",
            "--strict-readiness=true", "--exit-on-error=false",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]
        log.info("starting tritonserver on %s (http %d, grpc %d, metrics %d), log %s", self.repo,
                 self.ports["http"], self.ports["grpc"], self.ports["metrics"], self.log_path)
        with open(self.log_path, "ab") as logf:
            self.process = subprocess.Popen(
                cmd, env=server_env(), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_set_pdeathsig if self.kill_with_parent else None,
            )
        return self

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S, models: list[str] | None = None) -> None:
        """Poll until the server and every model in the repository (or ``models``) are READY.

        Raises:
            ModelError: a model failed to load (the reason from Triton's repository index).
            InferenceUnavailableError: the process exited, or ``timeout_s`` passed first.

        Ports given as 0 are picked again (twice at most) if another process took one
        between picking and binding.
        """
        from genimg.triton.repo import served_models

        wanted = set(models or served_models(self.repo))
        deadline = time.monotonic() + timeout_s
        states: dict[str, tuple[str, str]] = {}
        port_retries = 2 if 0 in self._ports.values() else 0
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None and port_retries and \
                    "already in use" in self.log_tail():
                port_retries -= 1  # another process took a port picked as free: pick again
                log.warning("a port picked for tritonserver was taken meanwhile; restarting on new ports")
                self._reap()
                self.start()
                continue
            if self.process is None or self.process.poll() is not None:
                in_log = re.findall(r"failed to load '([^']+)'[^\n]*", self.log_tail(20000))
                if in_log:
                    raise ModelError(f"models failed to load: {sorted(set(in_log))}; log tail:\n{self.log_tail()}")
                raise InferenceUnavailableError(f"tritonserver exited (code {self.process and self.process.returncode})"
                                                f" while loading; log tail:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                states = self._index()
            failed = {m: r for m, (s, r) in states.items() if m in wanted and s == "UNAVAILABLE" and r}
            if failed:
                raise ModelError(f"models failed to load: {failed}; log tail:\n{self.log_tail()}")
            if states and all(states.get(m, ("", ""))[0] == "READY" for m in wanted) and self.is_ready():
                return
            time.sleep(_POLL_S)
        raise InferenceUnavailableError(f"models not READY within {timeout_s:g} s: "
                                        f"{ {m: states.get(m, ('MISSING', ''))[0] for m in sorted(wanted)} }")

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM the server, wait, then SIGKILL its process group if needed; remove leftovers.

        Args:
            timeout_s: seconds to wait for a clean exit (default ``exit_timeout_s + 15``).

        Returns:
            the server's exit code (``None`` if it was never started).
        """
        code = self._reap(self.exit_timeout_s + 15 if timeout_s is None else timeout_s)
        if self._own_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None
        return code

    def restart(self) -> int | None:
        """Start the server again on the ports it had, after its process died (a crash, a kill) or is stopped.

        What the old process left (its process group, leaked shared memory) is removed first; the work
        directory and ``triton.log`` are kept (the log is appended to). Clients keep their addresses.
        Call :meth:`wait_ready` afterwards.

        Returns:
            the old process's exit code (negative: the signal that ended it).

        Raises:
            ConfigError: the server was never started.
        """
        if not self.ports:
            raise ConfigError("server never started: nothing to restart")
        code = self._reap(self.exit_timeout_s + 15)
        self._ports = dict(self.ports)  # the same ports, not new free ones
        self.start()
        return code

    def _reap(self, timeout_s: float = 0.0) -> int | None:
        """SIGTERM, wait ``timeout_s``, SIGKILL the process group, remove leaked shm; returns the exit code."""
        proc, self.process = self.process, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not exit in time; killing its process group")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # stub processes still in the group, if any
            code = proc.wait()
            log.info("tritonserver exited with code %s", code)
        for leftover in self.shm_files():
            log.warning("removing leaked shared memory %s", leftover)
            with contextlib.suppress(OSError):
                leftover.unlink()
        return code

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- introspection -----------------------------------------------------------------------
    @property
    def urls(self) -> dict[str, str]:
        """``{"http": "host:port", "grpc": "host:port", "metrics": "http://host:port/metrics"}``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return {"http": f"{host}:{self.ports['http']}", "grpc": f"{host}:{self.ports['grpc']}",
                "metrics": f"http://{host}:{self.ports['metrics']}/metrics"}

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def log_path(self) -> Path:
        assert self.work_dir is not None, "log exists once started"
        return self.work_dir / "triton.log"

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The last ``n_bytes`` of ``triton.log``."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - n_bytes))
                return f.read().decode("utf-8", "replace")
        except (OSError, AssertionError):
            return ""

    def shm_files(self) -> list[Path]:
        """Shared-memory files of this server's Python backend still in ``/dev/shm``."""
        shm = Path("/dev/shm")
        return sorted(shm.glob(f"{self.shm_prefix}*")) if shm.is_dir() else []

    def is_ready(self) -> bool:
        """Whether Triton answers ``/v2/health/ready`` with 200 (every model loaded, strict readiness)."""
        try:
            self._get("/v2/health/ready")
        except (OSError, urllib.error.URLError):
            return False
        return True

    def _get(self, path: str, data: bytes | None = None) -> bytes:
        req = urllib.request.Request(f"http://{self.urls['http']}{path}", data=data,
                                     method="POST" if data is not None else "GET")
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.read()

    def _index(self) -> dict[str, tuple[str, str]]:
        """``{model: (state, reason)}`` from Triton's repository index."""
        rows = json.loads(self._get("/v2/repository/index", b"{}") or b"[]")
        return {r["name"]: (r.get("state", ""), r.get("reason", "")) for r in rows}
