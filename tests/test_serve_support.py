"""Helpers shared by the test_serve*.py files (no tests here): the tiny pipeline, live servers, test doubles."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

from PIL import Image

from openjanus.pipeline import JanusPipeline

_PIPES: dict[Path, JanusPipeline] = {}


def tiny_pipe(model_dir: Path) -> JanusPipeline:
    """The tiny random pipeline, loaded once per test session."""
    if model_dir not in _PIPES:
        _PIPES[model_dir] = JanusPipeline.from_pretrained(model_dir, device="cpu")
    return _PIPES[model_dir]


def png_bytes(size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A small PNG with a coloured square in it."""
    image = Image.new("RGB", size, color)
    image.paste((20, 160, 60), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes | None = None, mime: str = "image/png") -> str:
    """A base64 data: URL (a test PNG by default)."""
    return f"data:{mime};base64,{base64.b64encode(png_bytes() if data is None else data).decode()}"


def image_message(text: str = "What is in the image?") -> dict:
    """A user message with one image part and one text part."""
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}},
                                        {"type": "text", "text": text}]}


def decode_png(b64: str) -> Image.Image:
    """The image in a b64_json answer."""
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class LiveServer:
    """A real uvicorn server for an app on a free loopback port, in a thread; use as a context manager."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=2))
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


class SlowPipe:
    """A real pipeline with a delay per decoding step, recording batch sizes and steps run.

    Its `generate_image_tokens` takes the `on_step` hook the server uses when a pipeline offers it.
    """

    def __init__(self, pipe: JanusPipeline, delay: float = 0.05, image_steps: int = 8):
        self._pipe = pipe
        self.delay = delay
        self.image_steps = image_steps
        self.chat_batches: list[int] = []
        self.image_batches: list[int] = []
        self.steps = 0
        self.image_steps_run = 0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream_answers(self, conversations, **kwargs):
        self.chat_batches.append(len(conversations))
        for pieces in self._pipe.stream_answers(conversations, **kwargs):
            time.sleep(self.delay)
            self.steps += 1
            yield pieces

    def generate_image_tokens(self, prompts, on_step=None, **kwargs):
        self.image_batches.append(len(prompts))
        for _ in range(self.image_steps):
            time.sleep(self.delay)
            self.image_steps_run += 1
            if on_step is not None:
                on_step()
        return self._pipe.generate_image_tokens(prompts, **kwargs)


class BrokenPipe:
    """A pipeline whose model calls fail with an error that names a file path."""

    def __init__(self, pipe: JanusPipeline):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream_answers(self, conversations, **kwargs):
        raise RuntimeError("CUDA exploded in /home/secret/openjanus/model.py line 12")
        yield  # pragma: no cover

    def generate_image_tokens(self, prompts, **kwargs):
        raise RuntimeError("CUDA exploded in /home/secret/openjanus/model.py line 12")
