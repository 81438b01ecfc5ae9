"""A real server under faults: full queue, time limits, clients that go away, batching of concurrent requests."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve_support import LiveServer, SlowPipe, image_message, tiny_pipe  # noqa: E402

from openjanus.serve import ServeSettings  # noqa: E402
from openjanus.serve.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return tiny_pipe(tiny_model_dir)


def serve(pipe, **settings) -> LiveServer:
    return LiveServer(create_app(pipe, ServeSettings(**{"model_id": "tiny", "max_tokens_limit": 256, **settings})))


def chat(text: str = "hi", max_tokens: int = 4, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **extra}


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    values = [float(v) for v in re.findall(rf"^{re.escape(name)} ([\d.e+-]+)$", text, flags=re.M)]
    return values[0] if values else 0.0


def test_full_queue_answers_429_with_retry_after(pipe):
    slow = SlowPipe(pipe, delay=0.05)
    with serve(slow, max_queue=1, max_batch_size=1, retry_after=2) as server, ThreadPoolExecutor(2) as pool:
        url = f"{server.url}/v1/chat/completions"
        running = pool.submit(httpx.post, url, json=chat(max_tokens=20), timeout=30)
        wait_for(lambda: slow.chat_batches)  # the first request is on the model
        waiting = pool.submit(httpx.post, url, json=chat(max_tokens=2), timeout=30)
        wait_for(lambda: httpx.get(f"{server.url}/health").json()["queue_depth"] == 1)
        started = time.monotonic()
        refused = httpx.post(url, json=chat(), timeout=30)
        assert time.monotonic() - started < 1.0, "a full queue answers at once"
        assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
        assert refused.json()["error"]["code"] == "queue_full"
        assert running.result().status_code == 200 and waiting.result().status_code == 200
        assert httpx.post(url, json=chat(), timeout=30).status_code == 200


def test_time_limit_cancels_with_a_clear_error_and_the_server_goes_on(pipe):
    slow = SlowPipe(pipe, delay=0.1)
    with serve(slow, request_timeout=0.5) as server:
        url = f"{server.url}/v1/chat/completions"
        started = time.monotonic()
        response = httpx.post(url, json=chat(max_tokens=100), timeout=30)
        assert response.status_code == 408 and time.monotonic() - started < 3
        error = response.json()["error"]
        assert error["type"] == "timeout_error" and "0.5 s" in error["message"]
        steps = slow.steps
        time.sleep(0.5)
        assert slow.steps <= steps + 1, "the cancelled request's decoding stopped"
        stream = httpx.post(url, json=chat(max_tokens=100, stream=True), timeout=30)
        assert stream.status_code == 200
        assert '"timeout_error"' in stream.text and stream.text.rstrip().endswith("data: [DONE]")
        assert httpx.post(url, json=chat(max_tokens=1), timeout=30).status_code == 200
        image = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x"}, timeout=30)
        assert image.status_code == 408
        time.sleep(0.5)
        assert slow.image_steps_run < slow.image_steps, "image generation stopped through the step hook"
        assert metric(server.url, 'openjanus_cancelled_requests_total{reason="timeout"}') >= 3


def test_disconnect_mid_stream_stops_the_work(pipe):
    slow = SlowPipe(pipe, delay=0.05)
    with serve(slow) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        body = {"messages": [image_message()], "max_tokens": 200, "temperature": 1.0, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]
            assert all(line.startswith("data: ") or not line for line in received)
        wait_for(lambda: metric(server.url, 'openjanus_cancelled_requests_total{reason="disconnect"}') == 1)
        steps = slow.steps
        time.sleep(0.4)
        assert slow.steps <= steps + 1 and slow.steps < 100, "decoding stopped soon after the client left"
        assert client.post("/v1/chat/completions", json=chat()).status_code == 200


def test_disconnect_while_waiting_for_a_whole_answer(pipe):
    slow = SlowPipe(pipe, delay=0.05)
    with serve(slow) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", json=chat(max_tokens=200), timeout=0.5)
        wait_for(lambda: metric(server.url, 'openjanus_cancelled_requests_total{reason="disconnect"}') == 1)
        steps = slow.steps
        time.sleep(0.4)
        assert slow.steps <= steps + 1 and slow.steps < 100
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x"}, timeout=0.2)
        wait_for(lambda: metric(server.url, 'openjanus_cancelled_requests_total{reason="disconnect"}') == 2)
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_concurrent_requests_share_batches_and_get_their_own_answers(pipe):
    slow = SlowPipe(pipe, delay=0.02)
    questions = ["hi", "What is in the image?", "Describe the shapes", "hello there"]
    expected = [pipe.answer([[{"role": "user", "content": q}]], max_new_tokens=6)[0] for q in questions]
    with serve(slow, batch_wait=0.05) as server, ThreadPoolExecutor(8) as pool:
        url = server.url
        # Block the worker for a moment so that everything below queues up and is batched.
        blocker = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=chat(max_tokens=30), timeout=30)
        wait_for(lambda: slow.chat_batches)
        answers = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=chat(q, max_tokens=6), timeout=30)
                   for q in questions]
        images = [pool.submit(httpx.post, f"{url}/v1/images/generations", json={"prompt": f"shape {i}", "n": 2},
                              timeout=30) for i in range(3)]
        assert blocker.result().status_code == 200
        got = [future.result().json()["choices"][0]["message"]["content"] for future in answers]
        assert got == expected
        assert all(len(future.result().json()["data"]) == 2 for future in images)
    assert max(slow.chat_batches) > 1, slow.chat_batches
    assert max(slow.image_batches) > 2, slow.image_batches


def test_shutdown_stops_the_worker_and_leaves_no_request_hanging(pipe):
    slow = SlowPipe(pipe, delay=0.05)
    outcomes = []

    def call(url):
        try:
            outcomes.append(httpx.post(url, json=chat(max_tokens=30), timeout=30).status_code)
        except httpx.TransportError:  # uvicorn closes connections still open after its graceful period
            outcomes.append("closed")

    server = serve(slow, max_batch_size=1)
    with server:
        threads = [threading.Thread(target=call, args=(f"{server.url}/v1/chat/completions",)) for _ in range(3)]
        for thread in threads:
            thread.start()
        wait_for(lambda: slow.chat_batches)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 8
    for thread in threads:
        thread.join(10)
    assert len(outcomes) == 3 and set(outcomes) <= {200, 503, "closed"}
    assert not server.thread.is_alive() and not server.app.state.scheduler.alive
