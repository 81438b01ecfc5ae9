"""Fuzzing: malformed and random bodies never make the server answer 5xx.

Two fuzzers: schemathesis, driven by the app's own OpenAPI schema (positive and negative
cases for every operation), and hypothesis, with near-valid OpenAI bodies and arbitrary JSON.
"""

from __future__ import annotations

import base64
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_serve_support import LiveServer, png_bytes, tiny_pipe  # noqa: E402

from openjanus.serve import ServeSettings  # noqa: E402
from openjanus.serve.app import create_app  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    limits = ServeSettings(model_id="tiny", default_max_tokens=4, max_tokens_limit=8, max_images_per_request=2,
                           max_body_bytes=256 * 1024, request_timeout=30)
    with LiveServer(create_app(tiny_pipe(tiny_model_dir), limits)) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def assert_no_server_error(response) -> None:
    assert response.status_code < 500, f"HTTP {response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"]
        assert "Traceback" not in response.text


def test_schemathesis_finds_no_server_error(server):
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed "
                                                              "(pip install schemathesis)")
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: dict[str, set[int]] = {}
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/images/generations"}
    def fuzz(operation, mode, examples: int):
        @settings(FUZZ, max_examples=examples)
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            response = case.call(base_url=server.url)
            statuses.setdefault(operation.label, set()).add(response.status_code)
            assert_no_server_error(response)

        check()

    for operation in operations:
        if operation.method.upper() == "POST":
            for mode in schemathesis.GenerationMode:
                fuzz(operation, mode, 40)
        else:  # GET routes take no body; a path string cannot be made invalid, so only positive cases exist
            fuzz(operation, schemathesis.GenerationMode.POSITIVE, 10)
    assert 400 in statuses["POST /v1/chat/completions"] and {200, 400} <= statuses["POST /v1/images/generations"]


FINITE = st.floats(allow_nan=False, allow_infinity=False)
SCALARS = st.none() | st.booleans() | st.integers() | FINITE | st.text(max_size=20)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
PNG_URL = "data:image/png;base64," + base64.b64encode(png_bytes((8, 8))).decode()
URLS = st.sampled_from([PNG_URL, PNG_URL[:60], "data:image/png;base64,", "data:,", "http://127.0.0.1:1/x.png",
                        "file:///etc/passwd", "", "data:text/plain;base64,aGVsbG8="]) | st.text(max_size=30)
PARTS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": URLS})}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": URLS}),
    st.dictionaries(st.sampled_from(["type", "text", "image_url"]), JSON, max_size=3),
)
MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""]),
    "content": st.one_of(st.text(max_size=40), st.lists(PARTS, max_size=3), st.none(), JSON),
}), max_size=4)
NUMBER = st.one_of(st.none(), st.integers(-5, 100), st.floats(-2, 5), st.text(max_size=3))
CHAT = st.fixed_dictionaries({"messages": MESSAGES}, optional={
    "model": st.text(max_size=10), "stream": st.booleans(), "temperature": NUMBER, "top_p": NUMBER,
    "top_k": NUMBER, "max_tokens": NUMBER, "seed": NUMBER, "n": NUMBER,
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6), JSON),
    "stream_options": st.one_of(JSON, st.fixed_dictionaries({"include_usage": st.booleans()})),
})
IMAGES = st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=40), JSON)}, optional={
    "n": NUMBER, "size": st.sampled_from(["32x32", "384x384", "1024x1024", "", "auto", "32"]) | JSON,
    "response_format": st.sampled_from(["b64_json", "url", ""]) | JSON, "guidance_scale": NUMBER, "seed": NUMBER,
    "temperature": NUMBER, "cfg_weight": NUMBER,
})


@FUZZ
@given(body=CHAT)
def test_near_valid_chat_bodies(http, body):
    assert_no_server_error(http.post("/v1/chat/completions", json=body))


@FUZZ
@given(body=IMAGES)
def test_near_valid_image_bodies(http, body):
    assert_no_server_error(http.post("/v1/images/generations", json=body))


@settings(FUZZ, max_examples=40)
@given(route=st.sampled_from(["/v1/chat/completions", "/v1/images/generations"]),
       body=st.one_of(JSON.map(json.dumps), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))),
       content_type=st.sampled_from(["application/json", "text/plain", "multipart/form-data", ""]))
def test_arbitrary_bodies(http, route, body, content_type):
    headers = {"content-type": content_type} if content_type else {}
    assert_no_server_error(http.post(route, content=body.encode("utf-8", "surrogatepass"), headers=headers))
