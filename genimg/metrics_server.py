"""The worker's /metrics endpoint: aggregates every process of the pod (multiprocess mode).

Before each scrape, under one lock (scrapes and housekeeping never overlap):

* the live-gauge files of processes that no longer exist (a pool child killed
  with -9 never runs its exit hook) are removed, so ``genimg_shards_in_flight``
  returns to 0 (case C4);
* the counter and histogram files of dead processes are folded into one
  ``counter_archive.db`` / ``histogram_archive.db`` (:func:`compact_dead_files`):
  their counts stay in the totals, but a worker that recycles a child after
  every shard no longer leaves one more file per shard for every scrape to read.
"""

from __future__ import annotations

import os
import re
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.exposition import MetricsHandler
from prometheus_client.mmap_dict import MmapedDict  # internal module: pyproject bounds prometheus_client (<0.27)

from genimg.metrics import mark_process_dead, multiprocess_registry

_LIVE_FILE = re.compile(r"^gauge_live\w*_(\d+)\.db$")
_SUMMED_FILE = re.compile(r"^(counter|histogram|summary)_(\d+)\.db$")
ARCHIVE_TAG = "archive"
"""Stands for the pid in the file that holds the folded counts of dead processes (``counter_archive.db``)."""
_SCRAPE_LOCK = threading.Lock()


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
        mark_process_dead(pid, directory)
    return len(dead)


def compact_dead_files(directory: str | os.PathLike[str]) -> int:
    """Fold the counter, histogram and summary files of dead processes into one archive file per type.

    Values are added key by key: a multiprocess file holds a process's own
    counts (histogram buckets not yet cumulated), so the sum over files, and
    therefore every exported total, is unchanged. The archive is written to a
    temporary name and renamed over the old one before the folded files are
    deleted. A concurrent collect over the same directory could count a file
    twice in between: callers serialise the two (the /metrics handler holds
    one lock for both).

    Returns:
        How many files were folded.
    """
    d = Path(directory)
    dead: dict[str, list[Path]] = {}
    for f in d.iterdir():
        m = _SUMMED_FILE.match(f.name)
        if m and not _pid_alive(int(m.group(2))):
            dead.setdefault(m.group(1), []).append(f)
    folded = 0
    for typ, files in dead.items():
        archive = d / f"{typ}_{ARCHIVE_TAG}.db"
        totals: dict[str, float] = {}
        for f in ([archive] if archive.exists() else []) + files:
            for key, value, _, _ in MmapedDict.read_all_values_from_file(str(f)):
                totals[key] = totals.get(key, 0.0) + value
        tmp = d / f"{typ}_{ARCHIVE_TAG}.db.tmp"  # not *.db: the collector never reads it
        tmp.unlink(missing_ok=True)
        out = MmapedDict(str(tmp))
        try:
            for key, value in totals.items():
                out.write_value(key, value, 0.0)
        finally:
            out.close()
        os.replace(tmp, archive)
        for f in files:
            f.unlink()
        folded += len(files)
    return folded


def housekeep(directory: str | os.PathLike[str]) -> None:
    """Drop dead processes' live gauges and fold their counts (see the module docstring)."""
    reap_dead_live_gauges(directory)
    compact_dead_files(directory)


def scrape_body(directory: str | os.PathLike[str]) -> bytes:
    """Housekeep, then render every process's samples in the text format, under one lock."""
    with _SCRAPE_LOCK:
        housekeep(directory)
        return generate_latest(multiprocess_registry(directory))


class _Handler(MetricsHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = scrape_body(os.environ["PROMETHEUS_MULTIPROC_DIR"])
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
