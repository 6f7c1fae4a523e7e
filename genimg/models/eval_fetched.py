"""Figures for the fetched models: ESRGAN ×4 PSNR against bicubic, ONNX Runtime CPU timings.

``python -m genimg.models.eval_fetched [--cache-dir DIR]`` prints one JSON
object (models fetched first if needed). Needs ``scikit-image`` (the
``train`` extra) for the held-out photos; no torch.

PSNR protocol: each held-out photo (scikit-image's bundled ``astronaut``,
``chelsea``, ``coffee``, ``rocket``; as far as we can tell none is in DIV2K,
the ESRGAN models' training set) is cropped to a multiple of 4, downscaled
×4 with PIL's antialiased bicubic filter
(:func:`genimg.models.data.downscale_bicubic`), upscaled ×4 again by the
model and by PIL bicubic, and compared with the original crop: PSNR over all
RGB uint8 values (peak 255).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HELDOUT = ("astronaut", "chelsea", "coffee", "rocket")
"""Held-out RGB photos from ``skimage.data``."""


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays of equal shape (peak 255)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _session(path: Path, threads: int = 0):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bicubic_x4(lr: np.ndarray) -> np.ndarray:
    """PIL bicubic ×4 of a uint8 [h, w, 3] image."""
    from PIL import Image

    return np.asarray(Image.fromarray(lr).resize((lr.shape[1] * 4, lr.shape[0] * 4), Image.Resampling.BICUBIC))


def esrgan_psnr(onnx_path: Path, images: tuple[str, ...] = HELDOUT) -> dict:
    """Per-image and mean PSNR (dB) of an ESRGAN ×4 ONNX file and of bicubic, on held-out photos."""
    from genimg.models.data import downscale_bicubic, load_skimage

    sess = _session(onnx_path)
    rows: dict[str, dict[str, float | list[int]]] = {}
    dbs: dict[str, list[float]] = {"model_db": [], "bicubic_db": []}
    for name in images:
        hr, lr = downscale_bicubic(load_skimage(name))
        sr = sess.run(["UPSCALED"], {"IMAGE": lr[None]})[0][0]
        model_db, bicubic_db = round(psnr_db(sr, hr), 3), round(psnr_db(bicubic_x4(lr), hr), 3)
        rows[name] = {"model_db": model_db, "bicubic_db": bicubic_db, "lr_shape": list(lr.shape)}
        dbs["model_db"].append(model_db)
        dbs["bicubic_db"].append(bicubic_db)
    rows["mean"] = {k: round(float(np.mean(v)), 3) for k, v in dbs.items()}
    return rows


def ort_ms(onnx_path: Path, feeds: dict[str, np.ndarray], repeats: int = 5, threads: int = 1) -> dict[str, float]:
    """Median wall and process-CPU milliseconds of one ONNX Runtime CPU run on ``feeds`` (after a warm-up run).

    With ``threads=1`` (default) the CPU figure is the work one core does,
    which other load on the machine disturbs far less than the wall time.
    """
    sess = _session(onnx_path, threads)
    sess.run(None, feeds)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        sess.run(None, feeds)
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return {"wall_ms": round(float(np.median(wall)), 1), "cpu_ms": round(float(np.median(cpu)), 1)}


def timings(paths: dict[str, Path], threads: int = 1) -> dict[str, dict[str, float]]:
    """ONNX Runtime CPU milliseconds per call (``wall_ms``, ``cpu_ms``) at the sizes genimg uses."""
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {}
    if "terrain" in paths:
        for b in (1, 4):
            feeds = {"noisy": (rng.standard_normal((b, 1, 128, 128)) * 80).astype(np.float32),
                     "sigma": np.full(b, 80, np.float32), "difficulty": np.linspace(0, 1, b).astype(np.float32)}
            out[f"terrain_b{b}"] = ort_ms(paths["terrain"], feeds, 3, threads)
    if "faces" in paths:
        for b in (1, 16):
            out[f"faces_b{b}"] = ort_ms(paths["faces"], {"Z": rng.standard_normal((b, 100)).astype(np.float32)},
                                        5, threads)
    for name in ("esrgan_slim_x4", "esrgan_medium_x4"):
        if name in paths:
            for b in (1, 16):
                img = rng.integers(0, 256, (b, 64, 64, 3), dtype=np.uint8)
                out[f"{name}_64to256_b{b}"] = ort_ms(paths[name], {"IMAGE": img}, 3, threads)
    if "vintage" in paths:
        img = rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
        out["vintage_256_b1"] = ort_ms(paths["vintage"], {"IMAGE": img}, 2, threads)
    return out


def main(argv: list[str] | None = None) -> None:
    from genimg.models.fetch import fetch_all

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--no-timings", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for the timings")
    args = parser.parse_args(argv)
    paths = {r.name: r.path for r in fetch_all(None, args.cache_dir)}
    report = {name: esrgan_psnr(paths[name]) for name in ("esrgan_slim_x4", "esrgan_medium_x4")}
    if not args.no_timings:
        report["timings"] = {"threads": args.threads, **timings(paths, args.threads)}
    sys.stdout.write(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
