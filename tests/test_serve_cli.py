"""`openjanus serve`: defaults, options and the one-line failure without a model."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from openjanus import pipeline  # noqa: E402
from openjanus.serve.cli import register  # noqa: E402


def make_cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A stand-in for the openjanus CLI."""

    register(app)
    return app


@pytest.fixture
def runs(monkeypatch):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    monkeypatch.delenv("OPENJANUS_API_KEY", raising=False)
    return calls


def test_no_shipped_model_is_one_line_and_exit_1(monkeypatch, tmp_path, runs):
    monkeypatch.setattr(pipeline, "DEFAULT_MODEL_DIR", tmp_path / "missing")
    result = CliRunner().invoke(make_cli(), ["serve"])
    assert result.exit_code == 1 and not runs
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no default model" in lines[0]
    assert "Traceback" not in result.output


def test_serve_defaults_to_loopback(tiny_model_dir, runs):
    result = CliRunner().invoke(make_cli(), ["serve", "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    (app, kwargs), = runs
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 8000
    settings = app.state.settings
    assert settings.api_key is None and not settings.allow_remote_images and settings.cors_origins == ()
    assert settings.model_id == tiny_model_dir.name
    assert "warning" not in result.output


def test_serve_options_and_env_key(tiny_model_dir, runs, monkeypatch):
    monkeypatch.setenv("OPENJANUS_API_KEY", "from-env")
    args = ["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0", "--port", "9001", "--allow-remote-images",
            "--cors-origin", "http://a.test", "--cors-origin", "http://b.test", "--max-queue", "3",
            "--request-timeout", "12.5", "--model-name", "janus"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    (app, kwargs), = runs
    settings = app.state.settings
    assert (kwargs["host"], kwargs["port"]) == ("0.0.0.0", 9001)
    assert settings.api_key == "from-env" and settings.allow_remote_images
    assert settings.cors_origins == ("http://a.test", "http://b.test")
    assert (settings.max_queue, settings.request_timeout, settings.model_id) == (3, 12.5, "janus")
    assert "warning" not in result.output


def test_remote_bind_without_key_warns(tiny_model_dir, runs):
    result = CliRunner().invoke(make_cli(), ["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0"])
    assert result.exit_code == 0 and "without an API key" in result.output


def test_bad_model_dir_is_one_line(tmp_path, runs):
    result = CliRunner().invoke(make_cli(), ["serve", "--model", str(tmp_path)])
    assert result.exit_code == 1 and not runs
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error:")


def test_serve_without_arguments_serves_the_shipped_model(runs):
    from fastapi.testclient import TestClient

    result = CliRunner().invoke(make_cli(), ["serve"])
    assert result.exit_code == 0, result.output
    (app, kwargs), = runs
    assert app.state.settings.model_id == "shapes-tiny"
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["shapes-tiny"]
        images = client.post("/v1/images/generations", json={"prompt": "a photo of a red circle", "seed": 0})
        assert images.status_code == 200
        png = images.json()["data"][0]["b64_json"]
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What color is the circle?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}},
        ]}], "max_tokens": 8})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"].strip()
