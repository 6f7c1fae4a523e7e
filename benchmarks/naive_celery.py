"""Naive Celery baseline: what a user writes first. One task per image, two Triton calls, one S3 object.

The app a user would write against the same Triton server and the same S3 API,
with Celery's defaults (prefetch 4, early ack, a Redis result backend so the
submitter can wait on the results). Clients are created once per worker
process (a user who creates them per task is slower still). The item's noise
and prompt are those of genimg's job (same seed derivation), so the images are
the same; the PNG is PIL's with the same zlib level as genimg's. A task embeds
its prompt (``text_encoder``) and then calls ``txt2img`` with the embedding
(``COND``) and the noise: one task knows nothing of the others, so a prompt
with several images is embedded once per image.

Worker (from this directory)::

    NAIVE_BROKER_URL=redis://127.0.0.1:6379/0 NAIVE_TRITON_URL=127.0.0.1:8001 \\
    NAIVE_S3_ENDPOINT=http://127.0.0.1:5000 celery -A naive_celery worker --concurrency 2 -Q naive

Submit N images and wait (prints one JSON object with timings)::

    python naive_celery.py --prompts P.txt --images-per-prompt 50 --count 5000 --bucket B --prefix run1
"""

from __future__ import annotations

import io
import os
import time

import boto3
import numpy as np
import tritonclient.grpc as grpcclient
from celery import Celery, group
from PIL import Image

BROKER = os.environ.get("NAIVE_BROKER_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("NAIVE_QUEUE", "naive")

app = Celery("naive", broker=BROKER, backend=BROKER)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                task_default_queue=QUEUE, result_expires=3600, broker_connection_retry_on_startup=True)

_triton = None
_s3 = None


def triton():
    global _triton
    if _triton is None:
        _triton = grpcclient.InferenceServerClient(os.environ.get("NAIVE_TRITON_URL", "127.0.0.1:8001"))
    return _triton


def s3():
    global _s3
    if _s3 is None:
        _s3 = boto3.client("s3", endpoint_url=os.environ.get("NAIVE_S3_ENDPOINT"))
    return _s3


def noise(seed: int, index: int) -> np.ndarray:
    """The item's generator noise: genimg's definition (SeedSequence of four 32-bit words, then PCG64)."""
    m = 0xFFFF_FFFF
    words = np.array([seed & m, seed >> 32, index & m, index >> 32], dtype=np.uint32)
    item_seed = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])
    return np.random.default_rng(item_seed).standard_normal(100, dtype=np.float32)


@app.task(name="naive.generate_image")
def generate_image(prompt: str, seed: int, index: int, bucket: str, key: str) -> dict:
    t0 = time.perf_counter()
    p = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
    p.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
    emb = triton().infer("text_encoder", [p], outputs=[grpcclient.InferRequestedOutput("EMBEDDING")])
    c = grpcclient.InferInput("COND", [1, 384], "FP32")
    c.set_data_from_numpy(emb.as_numpy("EMBEDDING"))
    z = grpcclient.InferInput("Z", [1, 100], "FP32")
    z.set_data_from_numpy(noise(seed, index)[None])
    result = triton().infer("txt2img", [c, z], outputs=[grpcclient.InferRequestedOutput("IMAGE")])
    image = result.as_numpy("IMAGE")[0]
    t1 = time.perf_counter()
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0], mode="L").save(buf, format="PNG", compress_level=6)
    t2 = time.perf_counter()
    s3().put_object(Bucket=bucket, Key=key, Body=buf.getvalue(), ContentType="image/png")
    t3 = time.perf_counter()
    return {"infer": t1 - t0, "encode": t2 - t1, "upload": t3 - t2}


def main() -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="submit one task per image and wait for all")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--images-per-prompt", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--prefix", required=True)
    args = ap.parse_args()
    with open(args.prompts, encoding="utf-8") as f:
        prompts = f.read().splitlines()
    setup_cpu_s = time.process_time()
    t0 = time.perf_counter()
    res = group(generate_image.s(prompts[i // args.images_per_prompt], args.seed, i, args.bucket,
                                 f"{args.prefix}/{i:08d}.png") for i in range(args.count)).apply_async()
    t_sent = time.perf_counter()
    timings = res.get(timeout=3600)
    seconds = time.perf_counter() - t0
    res.forget()
    print(json.dumps({"images": args.count, "seconds": round(seconds, 3), "enqueue_s": round(t_sent - t0, 3),
                      "setup_cpu_s": round(setup_cpu_s, 3),
                      "images_per_s": round(args.count / seconds, 2), "stage_unit": "image",
                      "stage_samples": {k: [round(t[k], 5) for t in timings] for k in ("infer", "encode", "upload")}}))


if __name__ == "__main__":
    main()
