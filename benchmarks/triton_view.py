"""Triton's own view of ``txt2img``: throughput and server queue / compute time at concurrency 1..8.

What ``perf_analyzer -m txt2img --concurrency-range 1:8`` reports, measured
with tritonclient because the ``perf-analyzer`` package on this machine's
index is a placeholder (0.1.0, no binary). ``C`` client threads (one gRPC
client each) send requests of ``--batch`` items back to back for
``--seconds``, each as a genimg worker sends it: first ``text_encoder`` on the
batch's distinct prompts (``ceil(batch / --images-per-prompt)`` of them), then
``txt2img`` with their embeddings (``COND``, each row repeated for the images of
its prompt) and the noise ``Z``; Triton's ``/metrics`` counters are read before and after, and
their deltas give, per model (the ensemble and each composing model), the
average per request of ``nv_inference_queue_duration_us`` (waiting in the
dynamic batcher's queue) and of the ``nv_inference_compute_{input,infer,output}_duration_us``
(compute), and the executions (``nv_inference_exec_count``: batches formed).

    python benchmarks/triton_view.py --grpc 127.0.0.1:8001 --metrics http://127.0.0.1:8002/metrics \\
        --concurrency 1,2,4,8 --batch 1 --seconds 3
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_LINE = re.compile(r'^(nv_inference_[a-z_]+)\{([^}]*)\}\s+([0-9.eE+-]+)$')
COUNTERS = ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
            "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
            "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
            "nv_inference_request_duration_us")
PROMPTS = ["a handwritten 7", "the digit three", "number nine, written by hand", "a zero", "eight, neatly drawn"]


def scrape(url: str) -> dict[tuple[str, str], float]:
    """``{(metric, model): value}`` for the counters in :data:`COUNTERS`."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m.group(1) in COUNTERS:
            model = re.search(r'model="([^"]+)"', m.group(2))
            if model:
                key = (m.group(1), model.group(1))
                out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def level(grpc_url: str, metrics_url: str, concurrency: int, batch: int, seconds: float, ipp: int = 1) -> dict:
    import tritonclient.grpc as g

    before = scrape(metrics_url)
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []

    def client(k: int) -> None:
        c = g.InferenceServerClient(grpc_url)
        rng = np.random.default_rng(k)
        n_prompts = -(-batch // ipp)
        p = g.InferInput("PROMPT", [n_prompts, 1], "BYTES")
        p.set_data_from_numpy(np.array([[PROMPTS[(k + i) % len(PROMPTS)].encode()] for i in range(n_prompts)],
                                       dtype=np.object_))
        z = g.InferInput("Z", [batch, 100], "FP32")
        z.set_data_from_numpy(rng.standard_normal((batch, 100), dtype=np.float32))
        emb_out = [g.InferRequestedOutput("EMBEDDING")]
        out = [g.InferRequestedOutput(n) for n in ("IMAGE", "LABEL", "SCORE")]
        rows = np.arange(batch) // ipp
        try:
            while not stop.is_set():
                t = time.perf_counter()
                emb = c.infer("text_encoder", [p], outputs=emb_out).as_numpy("EMBEDDING")
                cond = g.InferInput("COND", [batch, emb.shape[1]], "FP32")
                cond.set_data_from_numpy(np.ascontiguousarray(emb[rows]))
                c.infer("txt2img", [cond, z], outputs=out)
                latencies[k].append(time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - reported in the result
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)  # the measurement window
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = scrape(metrics_url)
    lat = sorted(x for per in latencies for x in per)
    requests = len(lat)
    models: dict[str, dict] = {}
    for (metric, model), v in after.items():
        d = v - before.get((metric, model), 0.0)
        models.setdefault(model, {})[metric] = d
    per_model = {}
    for model, m in sorted(models.items()):
        n = m.get("nv_inference_request_success", 0.0)
        if not n:
            continue
        compute = sum(m.get(f"nv_inference_compute_{s}_duration_us", 0.0) for s in ("input", "infer", "output"))
        per_model[model] = {
            "requests": int(n), "executions": int(m.get("nv_inference_exec_count", 0)),
            "avg_batch": round(m.get("nv_inference_count", 0.0) / max(m.get("nv_inference_exec_count", 1.0), 1.0), 2),
            "queue_us_per_request": round(m.get("nv_inference_queue_duration_us", 0.0) / n, 1),
            "compute_us_per_request": round(compute / n, 1),
            "compute_infer_us_per_request": round(m.get("nv_inference_compute_infer_duration_us", 0.0) / n, 1),
            "request_us_per_request": round(m.get("nv_inference_request_duration_us", 0.0) / n, 1),
        }
    return {"concurrency": concurrency, "batch": batch, "images_per_prompt": ipp, "seconds": round(wall, 3),
            "requests": requests,
            "infer_per_s": round(requests / wall, 2), "images_per_s": round(requests * batch / wall, 2),
            "latency_p50_ms": round(1000 * lat[len(lat) // 2], 2) if lat else None,
            "latency_p95_ms": round(1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))], 2) if lat else None,
            "models": per_model, "errors": errors[:3]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--concurrency", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes per request")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--images-per-prompt", type=int, default=4,
                    help="images per distinct prompt of a request (the text encoder sees ceil(batch / this))")
    args = ap.parse_args(argv)
    levels = [level(args.grpc, args.metrics, c, b, args.seconds, args.images_per_prompt)
              for b in (int(x) for x in args.batch.split(",")) for c in (int(x) for x in args.concurrency.split(","))]
    report = {"tool": "tritonclient concurrency sweep + /metrics deltas",
              "why_not_perf_analyzer": "the perf-analyzer package available here is a placeholder (0.1.0) "
                                       "without the perf_analyzer binary",
              "model": "txt2img", "levels": levels}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
