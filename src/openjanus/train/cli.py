"""The `openjanus train` command, added to the main typer app by `register(app)`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..cli_errors import EXPECTED, fail, first_line


def register(app: typer.Typer) -> None:
    """Add the `train` command to `app`."""

    @app.command()
    def train(
        config: Annotated[Path, typer.Argument(help="Recipe YAML, e.g. configs/shapes-tiny.yaml.")],
        resume: Annotated[bool, typer.Option("--resume/--no-resume",
                                             help="Continue from the run directory's checkpoints.")] = True,
        run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory "
                                                     "(default: ~/.cache/openjanus/runs/<recipe name>).")] = None,
        stage: Annotated[str | None, typer.Option("--stage", help="Run only this stage.")] = None,
        max_steps: Annotated[int | None, typer.Option("--max-steps", min=1,
                                                      help="Stop every stage after N steps (smoke runs).")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print parameters by component and a memory "
                                                                 "estimate per device, then exit.")] = False,
        skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip bad records of data files (and report "
                                                                   "how many) instead of stopping.")] = False,
    ) -> None:
        """Train a recipe: all its stages in order, resumable; launch with torchrun for several processes."""
        from .runner import run

        try:
            last = run(config, resume=resume, run_dir=run_dir, max_steps=max_steps, dry_run=dry_run, stage=stage,
                       echo=typer.echo, skip_bad=skip_bad)
        except KeyboardInterrupt:
            typer.echo("interrupted; the last checkpoint is intact: run the same command again to resume", err=True)
            raise typer.Exit(code=130) from None
        except EXPECTED as exc:
            fail(first_line(exc))
        if last is not None and os.environ.get("RANK", "0") == "0":
            typer.echo(f"final model: {last}")
