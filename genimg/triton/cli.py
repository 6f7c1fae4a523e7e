"""``genimg triton``: run a local Triton Inference Server and probe one.

Examples::

    genimg models build-repo --flavor cpu --out model_repository
    genimg triton serve --repo model_repository                 # 8000 http, 8001 grpc, 8002 metrics
    genimg triton serve --repo model_repository --http-port 0   # 0 = any free port
    genimg triton ready --url 127.0.0.1:8001 --model txt2img    # exit 0 when ready
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import typer

from genimg.errors import GenImgError

app = typer.Typer(help="Run and probe Triton Inference Server.\n\n"
                  "Example: genimg triton serve --repo model_repository", no_args_is_help=True)


RESTART_WINDOW_S = 600.0
"""``--max-restarts`` counts the restarts of this many seconds."""

_SIGNALS = {int(s) for s in signal.Signals}


class _Stop(Exception):
    """Raised in the main thread by SIGTERM/SIGINT to unwind into a clean stop."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not interrupt the stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


@app.command()
def serve(
    repo: Path = typer.Option(..., "--repo", envvar="GENIMG_TRITON_REPO",
                              help="Model repository."),
    http_port: int = typer.Option(8000, envvar="GENIMG_TRITON_HTTP_PORT", help="HTTP port; 0 = any free port."),
    grpc_port: int = typer.Option(8001, envvar="GENIMG_TRITON_GRPC_PORT", help="gRPC port; 0 = any free port."),
    metrics_port: int = typer.Option(8002, envvar="GENIMG_TRITON_METRICS_PORT",
                                     help="Prometheus metrics port; 0 = any free port."),
    host: str = typer.Option("127.0.0.1", envvar="GENIMG_TRITON_HOST", help="Address to listen on."),
    exit_timeout_s: int = typer.Option(5, help="Triton's --exit-timeout-secs."),
    ready_timeout_s: float = typer.Option(180.0, help="Seconds to wait for every model to be READY."),
    log_verbose: int = typer.Option(0, help="Triton's --log-verbose level."),
    max_restarts: int = typer.Option(5, min=0, help="Restart tritonserver on its ports when it dies by itself, "
                                                    "at most this many times in 10 minutes (0: never)."),
) -> None:
    """Start tritonserver (nvidia-pytriton wheel) on REPO, wait until every model is READY, run until SIGTERM/SIGINT.

    Prints one JSON line ``{"event": "ready", "http": ..., "grpc": ..., "metrics": ..., "pid": ...,
    "log": ...}`` once ready. A tritonserver that dies by itself (the wheel's Triton 2.51 can segfault when a
    client cancels a request: triton-inference-server/server#7368) is restarted on the same ports, as a
    Kubernetes ``restartPolicy`` would, up to ``--max-restarts`` times in 10 minutes; each restart prints
    ``{"event": "restarted", ..., "exit_code": ...}`` once the models are READY again. Exit code 0 after a
    signal, 1 if the server fails to start or dies once too often.
    """
    from genimg.triton.server import TritonServer

    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, host=host,
                          exit_timeout_s=exit_timeout_s, log_verbose=log_verbose)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    code = 0
    try:
        server.start()
        server.wait_ready(ready_timeout_s)
        typer.echo(json.dumps({"event": "ready", **server.urls, "pid": server.pid, "shm_prefix": server.shm_prefix,
                               "log": str(server.log_path)}))
        sys.stdout.flush()
        restarts: list[float] = []
        while server.process is not None:
            died = server.process.wait()  # a signal interrupts this wait by raising _Stop
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW_S]
            how = f"code {died}" + (f" ({signal.Signals(-died).name})" if died < 0 and -died in _SIGNALS else "")
            if len(restarts) >= max_restarts:
                typer.echo(f"tritonserver exited by itself ({how}) after {len(restarts)} restarts in "
                           f"{RESTART_WINDOW_S / 60:g} min; giving up; log tail:\n{server.log_tail()}", err=True)
                break
            restarts.append(now)
            typer.echo(f"tritonserver exited by itself ({how}); restarting it on the same ports ({len(restarts)} "
                       f"of {max_restarts} in {RESTART_WINDOW_S / 60:g} min); log tail:\n{server.log_tail(1500)}",
                       err=True)
            server.restart()
            server.wait_ready(ready_timeout_s)
            typer.echo(json.dumps({"event": "restarted", **server.urls, "pid": server.pid, "exit_code": died,
                                   "shm_prefix": server.shm_prefix, "log": str(server.log_path)}))
            sys.stdout.flush()
        code = 1
    except _Stop as sig:
        typer.echo(f"{sig}: stopping tritonserver", err=True)
    except GenImgError as e:
        typer.echo(f"error: {e}", err=True)
        code = 1
    finally:
        server.stop()
    raise typer.Exit(code)


@app.command()
def ready(
    url: str = typer.Option("127.0.0.1:8001", envvar="GENIMG_TRITON_URL", help="Triton endpoint."),
    protocol: str = typer.Option("grpc", envvar="GENIMG_TRITON_PROTOCOL", help="grpc or http."),
    model: list[str] = typer.Option([], help="Models that must be ready (repeatable); default every "
                                             "profile's model (GENIMG_PROFILES_DIR)."),
    timeout_s: float = typer.Option(5.0, help="Seconds to wait."),
) -> None:
    """Exit 0 when Triton at URL has every MODEL ready, 1 otherwise (a readiness probe)."""
    from genimg.triton.client import InferenceClient

    try:
        if not model:
            from genimg.profiles import load_profiles

            model = load_profiles().triton_models()
        with InferenceClient(url, protocol, timeout_s=timeout_s) as client:
            client.wait_ready(model, timeout_s)
    except GenImgError as e:
        typer.echo(f"not ready: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo("ready")
