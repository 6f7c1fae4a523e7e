"""The worker's /metrics endpoint: aggregates every process of the pod (multiprocess mode).

Before each scrape, the live-gauge files of processes that no longer exist
(a pool child killed with -9 never runs its exit hook) are removed, so
``genimg_shards_in_flight`` returns to 0 (case C4).
"""

from __future__ import annotations

import os
import re
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.exposition import MetricsHandler

from genimg.metrics import mark_process_dead, multiprocess_registry

_LIVE_FILE = re.compile(r"^gauge_live\w*_(\d+)\.db$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_live_gauges(directory: str | os.PathLike[str]) -> int:
    """Remove live-gauge files of dead processes; returns how many pids were reaped."""
    pids = {int(m.group(1)) for f in Path(directory).iterdir() if (m := _LIVE_FILE.match(f.name))}
    dead = [p for p in pids if not _pid_alive(p)]
    for pid in dead:
        mark_process_dead(pid)
    return len(dead)


class _Handler(MetricsHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        reap_dead_live_gauges(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        body = generate_latest(multiprocess_registry())
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics on ``addr:port`` from a daemon thread of the calling (main) process."""
    server = ThreadingHTTPServer((addr, port), _Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
