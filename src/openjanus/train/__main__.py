"""`python -m openjanus.train CONFIG ...`: the train command on its own, e.g. under torchrun."""

import typer

from .cli import register

app = typer.Typer(add_completion=False)
register(app)

if __name__ == "__main__":
    app()
