"""``genimg models build-repo``: write the Triton model repository (see :mod:`genimg.triton.repo`).

Mounted on the ``genimg models`` app by :mod:`producer.cli` (model tooling never imports the serving code).

Examples::

    genimg models build-repo --flavor cpu --out model_repository
    genimg models build-repo --flavor cpu --out model_repository --instances 2 --onnx-dir .cache/genimg/onnx
    genimg models build-repo --flavor tensorrt --out gpu_repository --plan-dir .cache/genimg/engines
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from genimg.errors import GenImgError


class Flavor(StrEnum):
    cpu = "cpu"
    tensorrt = "tensorrt"


def build_repo(
    flavor: Flavor = typer.Option(Flavor.cpu, help="cpu: Python backend + ONNX Runtime; tensorrt: TensorRT plans."),
    out: Path = typer.Option(Path("model_repository"), envvar="GENIMG_TRITON_REPO",
                             help="Repository directory."),
    instances: int = typer.Option(1, min=1, help="Instances of each model (per GPU for tensorrt)."),
    onnx_dir: Path | None = typer.Option(None, help="ONNX files; default: export the committed weights into "
                                                    ".cache/genimg/onnx (reused while the weights are unchanged)."),
    plan_dir: Path | None = typer.Option(None, help="tensorrt: directory of {model}.plan from build-engines."),
    max_batch_size: int = typer.Option(256, min=64, help="Largest batch per request of every model."),
    intra_op_threads: int = typer.Option(1, min=1, help="ONNX Runtime threads per Python-backend instance."),
    queue_delay_us: int = typer.Option(2000, min=0, help="Dynamic batcher max queue delay, microseconds."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT that is not an earlier build."),
    profiles_dir: Path | None = typer.Option(None, "--profiles-dir", envvar="GENIMG_PROFILES_DIR",
                                             help="Profiles whose [serve] models and ensembles to write "
                                                  "(default: the bundled profiles)."),
    profiles_only: bool = typer.Option(False, "--profiles-only",
                                       help="Only the profiles' models: no digit models (no ONNX export)."),
    expander: bool | None = typer.Option(None, "--expander/--no-expander",
                                         help="Write prompt_expander (SmolLM2-135M-Instruct, fetched and converted "
                                              "once, cached) for jobs with expand (default: yes, unless "
                                              "--profiles-only).", show_default=False),
) -> None:
    """Write a Triton model repository: genimg's own models, then every profile's [serve] models and ensembles.

    Example: genimg models build-repo --profiles-dir my_profiles --profiles-only --out my_repository
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from genimg.profiles import load_profiles
    from genimg.triton.repo import build_repository

    try:
        profiles = load_profiles(profiles_dir)
        for path_, why in profiles.errors.items():
            typer.echo(f"warning: skipped profile {path_}: {why}", err=True)
        path = build_repository(out, flavor.value, onnx_dir, instances=instances, max_batch_size=max_batch_size,
                                intra_op_threads=intra_op_threads, queue_delay_us=queue_delay_us, plan_dir=plan_dir,
                                overwrite=force, profiles=profiles, genimg_models=not profiles_only,
                                expander=(not profiles_only) if expander is None else expander)
    except GenImgError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(str(path))
