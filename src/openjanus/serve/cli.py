"""The `openjanus serve` command."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from ..cli_errors import EXPECTED, fail, first_line
from ..cli_options import CompileOption, DeviceOption, DtypeOption


def register(app: typer.Typer) -> None:
    """Add the `serve` command to a Typer app (the openjanus CLI)."""
    app.command("serve")(serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Checkpoint directory; default: the shipped "
                                               "model.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback exposes the server.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="OPENJANUS_API_KEY", show_envvar=True,
                                                help="Require 'Authorization: Bearer KEY' on every route but "
                                                     "/health and the web page.")] = None,
    allow_remote_images: Annotated[bool, typer.Option(help="Let requests name http(s) image URLs, which the "
                                                           "server then fetches.")] = False,
    cors_origin: Annotated[list[str] | None, typer.Option(help="Allow browser pages from this origin "
                                                              "(repeatable); CORS is off without it.")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for the model; more get 429.")] = 16,
    request_timeout: Annotated[float, typer.Option(help="Seconds before a request is cancelled.")] = 300.0,
    max_batch_size: Annotated[int, typer.Option(help="Conversations decoded together.")] = 8,
    max_image_rows: Annotated[int, typer.Option(help="Images generated together.")] = 8,
    model_name: Annotated[str | None, typer.Option(help="Model id shown by /v1/models (default: the "
                                                        "checkpoint folder's name).")] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    quantization: Annotated[str | None, typer.Option(help="int8: weight-only int8 LLM and heads (about half the "
                                                          "weight bytes, faster on CPU); default none.")] = None,
    compile: CompileOption = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/images/generations) and a web page at /."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError:
        fail("the server needs its extra: pip install 'openjanus[serve]'")
    from ..pipeline import JanusPipeline, default_model_dir
    from .settings import ServeSettings

    try:
        settings = ServeSettings(model_id=model_name or (model or default_model_dir()).resolve().name,
                                 api_key=api_key or None, allow_remote_images=allow_remote_images,
                                 cors_origins=tuple(cors_origin or ()), max_queue=max_queue,
                                 request_timeout=request_timeout, max_batch_size=max_batch_size,
                                 max_image_rows=max_image_rows)
        pipe = JanusPipeline.from_pretrained(model, device=device, dtype=dtype, quantization=quantization,
                                             compile=compile)
    except EXPECTED as error:
        fail(first_line(error))
    if not _is_loopback(host) and not settings.api_key:
        typer.echo(f"warning: serving on {host} without an API key: anyone who can reach this port can use "
                   "the model (set --api-key or OPENJANUS_API_KEY)", err=True)
    typer.echo(f"openjanus: serving {settings.model_id} at http://{host}:{port}/ (API under /v1)", err=True)
    uvicorn.run(create_app(pipe, settings), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)
