"""The ``genimg`` command: one entry point, sub-commands per concern.

Example::

    genimg models train verifier --seed 0
    genimg models build-repo --flavor cpu --out model_repository
    genimg triton serve --repo model_repository
    genimg submit --prompts prompts.txt --output s3://bucket/run-7 --wait
    genimg status JOB_ID --json
"""

from __future__ import annotations

import logging
import os

import typer

app = typer.Typer(
    name="genimg",
    help="genimg: batch image generation for synthetic datasets.\n\n"
    "Example: genimg models eval --json",
    no_args_is_help=True,
    add_completion=False,
)


def _models_app() -> typer.Typer:
    """``genimg models``: the model tooling's commands, plus ``build-repo`` from the serving code they feed."""
    from genimg.models.cli import app as models
    from genimg.triton.cli_build import build_repo

    models.command("build-repo")(build_repo)
    return models


models_app = _models_app()


def _mount() -> None:
    from producer.commands import register
    from workers.cli import worker

    register(app)  # submit, status, wait, cancel, resume, manifest, ls, plan
    __import__("producer.demo").demo.register(app)  # genimg local up/down/status/env, genimg demo
    app.add_typer(models_app, name="models")
    app.command("worker")(worker)
    from genimg.exporter import exporter
    app.command("exporter")(exporter)
    from workers.reconcile import reconcile
    app.command("reconcile")(reconcile)
    try:
        from genimg.triton.cli import app as triton_app
    except ImportError:  # the triton sub-package is optional at this stage
        return
    app.add_typer(triton_app, name="triton")


@app.callback()
def _root(log_level: str = typer.Option(os.environ.get("GENIMG_LOG_LEVEL", "INFO"), "--log-level",
                                        help="Logging level [env GENIMG_LOG_LEVEL]")) -> None:
    from genimg.errors import ConfigError
    from genimg.redaction import REDACTION
    from genimg.settings import check_log_level

    try:
        level = check_log_level(log_level)
    except ConfigError as e:
        typer.echo(f"genimg: refusing to start: {e}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for handler in logging.getLogger().handlers:  # no credential in any log line (case C7)
        if REDACTION not in handler.filters:
            handler.addFilter(REDACTION)


_mount()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
