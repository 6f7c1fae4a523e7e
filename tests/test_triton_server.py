"""The local tritonserver: environment, readiness, dynamic batching and clean shutdown."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from genimg.errors import ModelError
from genimg import contract
from genimg.triton.client import InferenceClient
from genimg.triton.server import TritonServer, python_libdir, server_env, stub_path


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (tritonserver and its stubs carry the shm prefix)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(cmd)
    return found


def _metrics(url: str) -> dict[tuple[str, str], float]:
    """``{(metric, model): value}`` of Triton's Prometheus endpoint."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for m in re.finditer(r'^(nv_inference_\w+)\{model="([^"]+)",[^}]*\} (\S+)$', text, re.M):
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def test_stub_resolves_the_running_interpreters_libpython_first():
    if shutil.which("ldd") is None or python_libdir() is None:
        pytest.skip("needs ldd and a shared libpython")
    out = subprocess.run(["ldd", str(stub_path())], env=server_env(), capture_output=True, text=True, check=True)
    line = next(ln for ln in out.stdout.splitlines() if "libpython" in ln)
    assert str(python_libdir()) in line


def test_server_environment_leads_with_this_interpreters_directory_and_libraries():
    env = server_env({"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/lib/x86_64-linux-gnu", "PYTHONPATH": "/x"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libs[-1] == "/lib/x86_64-linux-gnu" and libs[1 if python_libdir() else 0].endswith("nvidia_pytriton.libs")
    assert "PYTHONPATH" not in env  # the stub ignores it (it runs with ignore_environment)


DIAG_MODEL = """
import json, platform, sys
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        from multiprocessing import shared_memory
        shm = shared_memory.SharedMemory(create=True, size=16)  # needs C core and stdlib of one version
        shm.close()
        shm.unlink()
        info = json.dumps({"version": platform.python_version(), "prefix": sys.prefix, "numpy": np.__version__})
        return [pb_utils.InferenceResponse([pb_utils.Tensor("INFO", np.array([[info.encode()]], dtype=object))])
                for _ in requests]
"""


def test_python_models_run_this_interpreter_and_environment_without_an_activated_venv(tmp_path, monkeypatch):
    model = tmp_path / "repo" / "diag"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(DIAG_MODEL)
    (model / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 1\n'
                                        'input { name: "X" data_type: TYPE_FP32 dims: [1] }\n'
                                        'output { name: "INFO" data_type: TYPE_STRING dims: [1] }\n')
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as when running .venv/bin/genimg without `activate`
    monkeypatch.setenv("LD_LIBRARY_PATH", "/lib/x86_64-linux-gnu")  # a system libpython first
    with TritonServer(tmp_path / "repo", exit_timeout_s=1) as server, InferenceClient(server.urls["grpc"]) as c:
        info = json.loads(c.infer("diag", {"X": np.zeros((1, 1), np.float32)})["INFO"][0, 0])
    assert info == {"version": platform.python_version(), "prefix": sys.prefix, "numpy": np.__version__}


def test_every_model_and_ensemble_is_ready_with_its_declared_batch_limit(triton_server):
    with InferenceClient(triton_server.urls["grpc"]) as client:
        client.wait_ready(list(contract.ALL) + ["prompt_echo"], timeout_s=5)
        for name in contract.ALL:
            assert client.max_batch_size(name) == 256


def test_sixteen_concurrent_single_item_requests_are_batched(triton_server):
    model = "text_encoder"
    before = _metrics(triton_server.urls["metrics"])
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with InferenceClient(triton_server.urls["grpc"]) as c:
                c.model_metadata(model)
                barrier.wait(timeout=30)
                emb = c.infer(model, {"PROMPT": [f"the digit {i % 10} written by hand, take {i}"]})["EMBEDDING"]
                assert emb.shape == (1, contract.EMBED_DIM)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    deadline = time.monotonic() + 10
    while True:  # counters are updated as responses complete; poll until all 16 are counted
        after = _metrics(triton_server.urls["metrics"])
        count = after[("nv_inference_count", model)] - before.get(("nv_inference_count", model), 0)
        execs = after[("nv_inference_exec_count", model)] - before.get(("nv_inference_exec_count", model), 0)
        if count >= 16 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert count == 16
    assert execs < count, f"{count} items ran in {execs} executions: no batching"


def test_stop_leaves_no_processes_or_shared_memory_even_with_a_client_still_connected(echo_repo):
    server = TritonServer(echo_repo, exit_timeout_s=1)
    server.start()
    try:
        server.wait_ready(60)
        client = InferenceClient(server.urls["http"], "http")  # keeps a connection open through the stop
        assert client.infer("prompt_echo", {"PROMPT": ["hi"]})["ECHO"][0, 0] == b"hi"
        assert server.shm_files() and _processes_mentioning(server.shm_prefix)
    finally:
        server.stop()
    assert server.shm_files() == []
    assert _processes_mentioning(server.shm_prefix) == []
    client.close()


def test_a_model_that_fails_to_load_is_named_with_its_reason(tmp_path, echo_repo):
    repo = tmp_path / "repo"
    shutil.copytree(echo_repo, repo)
    shutil.copytree(repo / "prompt_echo", repo / "broken")
    cfg = (repo / "broken" / "config.pbtxt").read_text().replace('"prompt_echo"', '"broken"')
    (repo / "broken" / "config.pbtxt").write_text(cfg)
    (repo / "broken" / "1" / "model.py").write_text("raise RuntimeError('this model cannot load')\n")
    server = TritonServer(repo, exit_timeout_s=1)
    server.start()
    try:
        with pytest.raises(ModelError, match="broken"):
            server.wait_ready(60)
    finally:
        server.stop()
    assert _processes_mentioning(server.shm_prefix) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_waits_for_ready_and_stops_cleanly_on_signal(echo_repo, sig):
    cmd = [sys.executable, "-m", "producer.cli", "triton", "serve", "--repo", str(echo_repo), "--http-port", "0",
           "--grpc-port", "0", "--metrics-port", "0", "--exit-timeout-s", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the one "ready" line, printed once every model is READY
        ready = json.loads(line)
        assert ready["event"] == "ready"
        with InferenceClient(ready["grpc"]) as c:
            assert c.infer("prompt_echo", {"PROMPT": ["ok"]})["ECHO"][0, 0] == b"ok"
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _processes_mentioning(ready["shm_prefix"]) == []
    assert list(Path("/dev/shm").glob(f"{ready['shm_prefix']}*")) == []
    assert not Path(ready["log"]).exists()  # the private work dir is removed


def test_serve_restarts_a_crashed_tritonserver_on_its_ports_then_gives_up_past_max_restarts(echo_repo):
    """tritonserver dies by SIGSEGV (how Triton 2.51 dies on server#7368): ``genimg triton serve`` starts it
    again on the same ports, prints a "restarted" line once READY, and clients on the old address are served.
    With ``--max-restarts 1`` a second crash within the window ends it with exit code 1, saying so."""
    cmd = [sys.executable, "-m", "producer.cli", "triton", "serve", "--repo", str(echo_repo), "--http-port", "0",
           "--grpc-port", "0", "--metrics-port", "0", "--exit-timeout-s", "2", "--max-restarts", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready"
        os.kill(ready["pid"], signal.SIGSEGV)
        again = json.loads(proc.stdout.readline())  # printed once every model is READY again
        assert again["event"] == "restarted" and again["exit_code"] == -signal.SIGSEGV, again
        assert again["grpc"] == ready["grpc"] and again["http"] == ready["http"] and again["pid"] != ready["pid"]
        with InferenceClient(ready["grpc"]) as c:
            assert c.infer("prompt_echo", {"PROMPT": ["back"]})["ECHO"][0, 0] == b"back"
        os.kill(again["pid"], signal.SIGSEGV)
        assert proc.wait(timeout=60) == 1
        err = proc.stderr.read()
        assert "exited by itself (code -11 (SIGSEGV)); restarting it on the same ports (1 of 1" in err, err
        assert "after 1 restarts in 10 min; giving up" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _processes_mentioning(ready["shm_prefix"]) == []
    assert not Path(ready["log"]).exists()


def test_infer_after_ready_returns_the_contract_shapes_through_the_ensemble(triton_server):
    with InferenceClient(triton_server.urls["grpc"]) as c:
        out = c.infer("noise2img", {"Z": np.zeros((2, contract.Z_DIM), np.float32)})
    assert out["IMAGE"].shape == (2, contract.OUT_SIDE, contract.OUT_SIDE, 1)


def test_a_port_taken_between_picking_and_binding_is_picked_again(echo_repo, monkeypatch):
    import socket

    import genimg.triton.server as server_module

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    picks = iter([squatter.getsockname()[1]])
    real = server_module.free_port
    monkeypatch.setattr(server_module, "free_port", lambda host="127.0.0.1": next(picks, None) or real(host))
    try:
        with TritonServer(echo_repo, exit_timeout_s=1) as server:
            assert server.ports["http"] != squatter.getsockname()[1]
            with InferenceClient(server.urls["http"], "http") as c:
                assert c.infer("prompt_echo", {"PROMPT": ["again"]})["ECHO"][0, 0] == b"again"
    finally:
        squatter.close()
