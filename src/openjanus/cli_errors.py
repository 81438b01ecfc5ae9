"""One way for every `openjanus` command to report expected failures: one line, no traceback."""

from __future__ import annotations

import functools

import typer

EXPECTED = (ValueError, RuntimeError, OSError, KeyError)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fail(message: str) -> None:
    """Print `error: message` on stderr and exit with code 1."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=1)


def clean_errors(func):
    """Turn expected failures into one line on stderr and exit code 1; Ctrl-C into exit code 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except EXPECTED as exc:
            fail(first_line(exc))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper
