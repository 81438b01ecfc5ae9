"""Load test on loopback: bounded clients for a bounded time; every request answered correctly or refused with 429.

Prints requests/s, p50/p95 latency and memory; run with `-s` to see the report as it is made.
"""

from __future__ import annotations

import gc
import json
import re
import statistics
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve_support import LiveServer, decode_png, rss_mb, tiny_pipe  # noqa: E402

from openjanus.serve import ServeSettings  # noqa: E402
from openjanus.serve.app import create_app  # noqa: E402

CLIENTS = 12
DURATION = 10.0
WARMUP = 2.0
MAX_TOKENS = 8
PROMPTS = ["hi", "What is in the image?", "Describe the shapes", "hello there", "Count the squares"]
KINDS = ["chat", "stream", "chat", "image", "stream"]


def check_chat(response, expected: str) -> None:
    body = response.json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == expected
    assert choice["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] <= MAX_TOKENS


def check_stream(response, expected: str) -> None:
    datas = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert datas[-1] == "[DONE]", "the stream ends with [DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    assert not any("error" in chunk for chunk in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == expected


def check_image(response, _: str) -> None:
    data = response.json()["data"]
    assert len(data) == 1 and decode_png(data[0]["b64_json"]).size == (32, 32)


def one_request(client: httpx.Client, kind: str, prompt: str, expected: str) -> str:
    """Send one request; 'ok' or '429', raising AssertionError on any other outcome."""
    if kind == "image":
        response = client.post("/v1/images/generations", json={"prompt": prompt, "n": 1})
    else:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "stream": kind == "stream"}
        response = client.post("/v1/chat/completions", json=body)
    if response.status_code == 429:
        assert response.headers.get("retry-after") and response.json()["error"]["code"] == "queue_full"
        return "429"
    assert response.status_code == 200, f"{kind}: HTTP {response.status_code} {response.text[:200]}"
    {"chat": check_chat, "stream": check_stream, "image": check_image}[kind](response, expected)
    return "ok"


def test_load(tiny_model_dir, capsys):
    pipe = tiny_pipe(tiny_model_dir)
    expected = {p: pipe.answer([[{"role": "user", "content": p}]], max_new_tokens=MAX_TOKENS)[0] for p in PROMPTS}
    settings = ServeSettings(model_id="tiny", max_queue=4, max_batch_size=4, max_image_rows=4, request_timeout=30)
    results: list[tuple[str, str, float, float]] = []  # kind, outcome, latency, finished at
    memory: list[float] = []
    lock = threading.Lock()

    with LiveServer(create_app(pipe, settings)) as server:
        start = time.monotonic()
        stop_at = start + DURATION

        def client_loop(index: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                turn = index
                while time.monotonic() < stop_at:
                    kind, prompt = KINDS[turn % len(KINDS)], PROMPTS[turn % len(PROMPTS)]
                    turn += 1
                    began = time.perf_counter()
                    try:
                        outcome = one_request(client, kind, prompt, expected[prompt])
                    except Exception as error:  # recorded, reported and failed below
                        outcome = f"error: {error!r}"[:300]
                    with lock:
                        results.append((kind, outcome, time.perf_counter() - began, time.monotonic() - start))
                    if outcome == "429":
                        time.sleep(0.05)  # a polite client backs off (less than Retry-After, to keep the load up)

        def sample_memory() -> None:
            while time.monotonic() < stop_at:
                gc.collect()
                memory.append(rss_mb())
                time.sleep(0.5)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
        threads.append(threading.Thread(target=sample_memory))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DURATION + 60)
        assert not any(thread.is_alive() for thread in threads), "a client hung"
        elapsed = time.monotonic() - start
        metrics = httpx.get(f"{server.url}/metrics").text

    errors = [r for r in results if r[1] not in ("ok", "429")]
    answered = [r for r in results if r[1] == "ok"]
    refused = [r for r in results if r[1] == "429"]
    latencies = sorted(r[2] for r in answered)
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    warm = [m for m, t in zip(memory, [i * 0.5 for i in range(len(memory))]) if t >= WARMUP]
    growth = max(warm) - min(warm) if warm else 0.0

    def served(route: str, status: str) -> int:
        pattern = rf'openjanus_requests_total\{{route="{route}",method="POST",status="{status}"\}} (\d+)'
        return sum(int(n) for n in re.findall(pattern, metrics))

    batches = {k: int(v) for k, v in re.findall(r'openjanus_batches_total\{kind="(\w+)"\} (\d+)', metrics)}
    rows = {k: int(v) for k, v in re.findall(r'openjanus_batch_rows_total\{kind="(\w+)"\} (\d+)', metrics)}
    report = (f"\nload test: {CLIENTS} clients x {DURATION:.0f} s on loopback: {len(results)} requests, "
              f"{len(answered)} answered, {len(refused)} refused with 429, {len(errors)} errors\n"
              f"  {len(answered) / elapsed:.1f} answered/s ({len(results) / elapsed:.1f} requests/s); latency of "
              f"answers p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms\n"
              f"  by kind: " + ", ".join(f"{k} {sum(1 for r in answered if r[0] == k)}" for k in sorted(set(KINDS)))
              + "\n  batches: " + ", ".join(f"{k} {batches[k]} (mean {rows[k] / batches[k]:.2f} rows)"
                                           for k in sorted(batches))
              + f"\n  memory (RSS after {WARMUP:.0f} s warm-up): {min(warm):.0f}-{max(warm):.0f} MiB, "
              f"spread {growth:.1f} MiB\n")
    with capsys.disabled():
        print(report)

    assert not errors, errors[:5]
    assert len(answered) >= CLIENTS, "the server answered under load"
    assert len(refused) > 0, "the bounded queue refused some requests (otherwise the test load is too light)"
    chat_ok = sum(1 for r in answered if r[0] != "image")
    assert served("/v1/chat/completions", "200") == chat_ok, "no lost responses: the server saw what clients got"
    assert served("/v1/images/generations", "200") == len(answered) - chat_ok
    assert served("/v1/chat/completions", "429") + served("/v1/images/generations", "429") == len(refused)
    assert not re.search(r'status="5\d\d"', metrics), "no 5xx"
    assert max(rows[k] / batches[k] for k in batches) > 1, "concurrent requests were batched"
    assert growth < 64, f"memory grew by {growth:.0f} MiB under steady load"
