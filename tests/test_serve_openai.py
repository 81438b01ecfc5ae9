"""The official `openai` Python client, unchanged, against a live server: chat (streamed and not) and images."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from test_serve_support import LiveServer, data_url, decode_png, tiny_pipe  # noqa: E402

from openjanus.serve import ServeSettings  # noqa: E402
from openjanus.serve.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    app = create_app(tiny_pipe(tiny_model_dir), ServeSettings(model_id="janus-tiny", api_key="sk-test",
                                                              max_tokens_limit=64))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=60)


MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                         {"type": "image_url", "image_url": {"url": data_url()}}]}]


def test_models(client):
    assert [model.id for model in client.models.list()] == ["janus-tiny"]
    assert client.models.retrieve("janus-tiny").id == "janus-tiny"


def test_chat(client):
    completion = client.chat.completions.create(model="janus-tiny", messages=MESSAGES, max_tokens=6, seed=1)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 6 and completion.usage.prompt_tokens > 16


def test_chat_stream(client):
    whole = client.chat.completions.create(model="janus-tiny", messages=MESSAGES, max_tokens=6)
    stream = client.chat.completions.create(model="janus-tiny", messages=MESSAGES, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_images(client):
    result = client.images.generate(model="janus-tiny", prompt="a green circle", n=2, size="32x32",
                                    response_format="b64_json", extra_body={"guidance_scale": 4.0, "seed": 5})
    assert len(result.data) == 2
    assert all(decode_png(item.b64_json).size == (32, 32) for item in result.data)


def test_errors_map_to_client_exceptions(client, server):
    with pytest.raises(openai.BadRequestError, match="32x32"):
        client.images.generate(prompt="x", size="1024x1024")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="janus-tiny", messages=[{"role": "user", "content": ""}])
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
