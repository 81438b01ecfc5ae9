"""The OpenAI-compatible API in-process: routes, answers that match the pipeline, limits, auth, errors."""

from __future__ import annotations

import http.server
import json
import re
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from test_serve_support import BrokenPipe, data_url, decode_png, image_message, png_bytes, tiny_pipe  # noqa: E402

from openjanus.serve import ServeSettings  # noqa: E402
from openjanus.serve.app import create_app  # noqa: E402

SETTINGS = dict(model_id="tiny", default_max_tokens=8, max_tokens_limit=64)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return tiny_pipe(tiny_model_dir)


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, ServeSettings(**SETTINGS))) as test_client:
        yield test_client


def make_client(pipe, **overrides) -> TestClient:
    return TestClient(create_app(pipe, ServeSettings(**{**SETTINGS, **overrides})), raise_server_exceptions=False)


def assert_openai_error(response, status: int) -> dict:
    """The response is `status` with an OpenAI error body that leaks no trace or path."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    assert "Traceback" not in response.text and not re.search(r"/\w+/\w+\.py", response.text)
    return error


def sse_payloads(text: str) -> list:
    """The data payloads of an SSE body; asserts it ends with [DONE]."""
    datas = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    return [json.loads(d) for d in datas[:-1]]


# ---------------------------------------------------------------------- routes


def test_models_health_and_page(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["image_size"] == 32
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert assert_openai_error(client.get("/v1/models/other"), 404)["code"] == "model_not_found"
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "sha256-" in page.headers["content-security-policy"]
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page.text), "the page must not load anything remote"
    assert_openai_error(client.get("/no/such/route"), 404)


def test_chat_with_image_matches_the_pipeline(client, pipe):
    message = image_message()
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [message], "max_tokens": 6})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    conversation = [{"role": "user", "content": [{"type": "image", "image": png_bytes()},
                                                 {"type": "text", "text": "What is in the image?"}]}]
    assert choice["message"]["content"] == pipe.answer([conversation], max_new_tokens=6)[0]
    usage = body["usage"]
    assert usage["prompt_tokens"] > pipe.config.vision.num_patches
    assert 0 < usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_multi_turn_and_system_message(client, pipe):
    messages = [{"role": "system", "content": "Be brief."}, image_message("What colour?"),
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And the square?"}]
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5})
    assert response.status_code == 200
    expected = pipe.answer([[{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "image", "image": png_bytes()},
                                                          {"type": "text", "text": "What colour?"}]},
                             {"role": "assistant", "content": "Red."},
                             {"role": "user", "content": "And the square?"}]], max_new_tokens=5)[0]
    assert response.json()["choices"][0]["message"]["content"] == expected


def test_stream_is_sse_ending_in_done(client):
    body = {"messages": [image_message()], "max_tokens": 6}
    whole = client.post("/v1/chat/completions", json=body).json()
    response = client.post("/v1/chat/completions",
                           json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(response.text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_sampling_options_stop_and_seed(client):
    base = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 12}
    sampled = {**base, "temperature": 1.0, "top_p": 0.95, "top_k": 200, "seed": 3}
    first = client.post("/v1/chat/completions", json=sampled).json()["choices"][0]
    again = client.post("/v1/chat/completions", json=sampled).json()["choices"][0]
    assert first == again and len(first["message"]["content"]) > 6
    text = first["message"]["content"]
    stop = text[4:6]
    stopped = client.post("/v1/chat/completions", json={**sampled, "stop": stop}).json()["choices"][0]
    assert stopped["message"]["content"] == text[:text.index(stop)] and stopped["finish_reason"] == "stop"
    other = client.post("/v1/chat/completions", json={**sampled, "seed": 4}).json()["choices"][0]
    assert other["message"]["content"] != text


def test_image_generation(client, pipe):
    response = client.post("/v1/images/generations", json={"prompt": "a red square", "n": 2, "size": "32x32",
                                                            "response_format": "b64_json", "seed": 7,
                                                            "guidance_scale": 3.0})
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    images = [decode_png(item["b64_json"]) for item in body["data"]]
    assert all(image.size == (32, 32) for image in images)
    expected = pipe.generate_images("a red square", num_images_per_prompt=2, guidance_scale=3.0, seed=7,
                                    progress=False)
    assert [image.tobytes() for image in images] == [image.convert("RGB").tobytes() for image in expected]
    again = client.post("/v1/images/generations", json={"prompt": "a red square", "n": 2, "seed": 7,
                                                         "guidance_scale": 3.0}).json()
    assert [d["b64_json"] for d in again["data"]] == [d["b64_json"] for d in body["data"]]


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x", "size": "1024x1024"}, "size", "'32x32'"),
    ({"prompt": "x", "response_format": "url"}, "response_format", "b64_json"),
    ({"prompt": "x", "n": 99}, "n", "at most 8"),
    ({"prompt": "   "}, "prompt", "empty"),
    ({"prompt": "a <image_placeholder> b"}, "prompt", "special token"),
    ({"prompt": "word " * 400}, "prompt", "too long"),
])
def test_image_generation_refusals(client, body, param, words):
    error = assert_openai_error(client.post("/v1/images/generations", json=body), 400)
    assert error["param"] == param and words in error["message"]


# ---------------------------------------------------------------------- untrusted input


def chat_body(content, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], **extra}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("body", [
    b"{not json",
    DEEP.encode(),
    b'"just a string"',
    b'{"messages": "hello"}',
    b'{"messages": [{"role": "wizard", "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}',
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": -1}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}',
    b'{"messages": [{"role": "user", "content": "hi"}], "n": 3}',
    b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}',
    b'{"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}',
    b'{"messages": [{"role": "assistant", "content": "I speak first"}]}',
    b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
    b'{"messages": [{"role": "user", "content": ""}]}',
    b'{"messages": [{"role": "user", "content": null}]}',
    b'{"messages": [{"role": "user", "content": "<image_placeholder>"}]}',
    json.dumps(chat_body([image_part("data:image/png;base64,@@@not-base64@@@")])).encode(),
    json.dumps(chat_body([image_part("data:image/png;base64," + "QUJD" * 10)])).encode(),
    json.dumps(chat_body([image_part("data:image/png,rawbytes")])).encode(),
    json.dumps(chat_body([image_part("file:///etc/passwd")])).encode(),
    json.dumps(chat_body([image_part("/etc/passwd")])).encode(),
    json.dumps(chat_body([image_part(data_url())] * 5)).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": [image_part(data_url())]}]}).encode(),
    json.dumps(chat_body("word " * 400)).encode(),
])
def test_malformed_chat_bodies_are_400(client, body):
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_remote_images_refused_unless_allowed(pipe):
    png = png_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    body = chat_body([image_part(url), {"type": "text", "text": "what?"}], max_tokens=2)
    try:
        with make_client(pipe) as closed:
            error = assert_openai_error(closed.post("/v1/chat/completions", json=body), 400)
            assert error["code"] == "remote_images_disabled" and "--allow-remote-images" in error["message"]
        with make_client(pipe, allow_remote_images=True) as open_:
            assert open_.post("/v1/chat/completions", json=body).status_code == 200
            missing = chat_body([image_part(url.replace("127.0.0.1", "127.0.0.1:1"))])
            assert_openai_error(open_.post("/v1/chat/completions", json=missing), 400)
    finally:
        server.shutdown()


def test_body_and_pixel_limits(pipe):
    with make_client(pipe, max_body_bytes=20_000, max_image_pixels=32 * 32) as client:
        big = chat_body("x" * 30_000)
        assert assert_openai_error(client.post("/v1/chat/completions", json=big), 413)["code"] == "body_too_large"
        large_image = chat_body([image_part(data_url(png_bytes(size=(64, 64))))])
        error = assert_openai_error(client.post("/v1/chat/completions", json=large_image), 400)
        assert error["code"] == "image_too_large" and "64x64" in error["message"]
        small = chat_body([image_part(data_url(png_bytes(size=(16, 16)))), {"type": "text", "text": "hi"}],
                          max_tokens=2)
        assert client.post("/v1/chat/completions", json=small).status_code == 200


def test_internal_errors_hide_details(pipe):
    with make_client(pipe, model_id="tiny") as client:
        client.app.state.scheduler.pipe = BrokenPipe(pipe)
        for route, body in [("/v1/chat/completions", chat_body("hi")), ("/v1/images/generations", {"prompt": "x"})]:
            error = assert_openai_error(client.post(route, json=body), 500)
            assert error["message"] == "internal server error" and "secret" not in json.dumps(error)
        client.app.state.scheduler.pipe = pipe
        assert client.post("/v1/chat/completions", json=chat_body("hi", max_tokens=2)).status_code == 200


# ---------------------------------------------------------------------- security defaults


def test_api_key_guards_every_route_but_health_and_page(pipe):
    with make_client(pipe, api_key="s3cret") as client:
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200
        for method, route in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                              ("POST", "/v1/images/generations"), ("GET", "/openapi.json"), ("GET", "/nope")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                response = client.request(method, route, headers=headers, json={})
                assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
                assert response.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.post("/v1/chat/completions", headers=good, json=chat_body("hi", max_tokens=2)).status_code == 200


def test_cors_is_off_unless_enabled(client, pipe):
    preflight = {"Origin": "http://elsewhere.test", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    assert "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": "http://x.test"}).headers
    assert "access-control-allow-origin" not in client.options("/v1/chat/completions", headers=preflight).headers
    with make_client(pipe, cors_origins=("http://elsewhere.test",), api_key="k") as cors:
        response = cors.options("/v1/chat/completions", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://elsewhere.test"
        other = cors.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers


def test_metrics_are_prometheus_text(client):
    client.post("/v1/chat/completions", json=chat_body("hi", max_tokens=2))
    client.post("/v1/images/generations", json={"prompt": "x"})
    client.post("/v1/images/generations", json={"prompt": "x", "size": "1x1"})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert re.search(r'openjanus_requests_total\{route="/v1/chat/completions",method="POST",status="200"\} \d+', text)
    assert re.search(r'openjanus_requests_total\{route="/v1/images/generations",method="POST",status="400"\} \d+', text)
    assert re.search(r'openjanus_request_duration_seconds_bucket\{route="/v1/chat/completions",le="\+Inf"\} \d+', text)
    for name in ("queue_depth", "tokens_per_second", "images_per_second", "generated_tokens_total",
                 "generated_images_total"):
        assert re.search(rf"^openjanus_{name} [\d.]+$", text, flags=re.M), name
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{([a-z_]+="[^"]*",?)*\})? [\d.e+-]+', line), line
