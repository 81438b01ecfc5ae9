"""OpenAI-compatible HTTP server and bundled web page for JanusPipeline (`openjanus serve`).

`create_app` lives in `openjanus.serve.app` (it needs the `serve` extra: fastapi, uvicorn);
this package itself imports nothing heavy so that the CLI can register the command cheaply.
"""

from .settings import ServeSettings

__all__ = ["ServeSettings"]
