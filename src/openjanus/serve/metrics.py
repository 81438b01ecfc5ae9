"""Prometheus text-format metrics, kept in-process without extra dependencies."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/images/generations")


def route_label(path: str) -> str:
    """A bounded label for a request path (unknown paths share one label)."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class _Rate:
    """Events per second over a sliding window."""

    def __init__(self, window: float = 30.0):
        self.window = window
        self.started = time.monotonic()
        self.events: deque[tuple[float, int]] = deque()

    def add(self, count: int) -> None:
        self.events.append((time.monotonic(), count))

    def per_second(self) -> float:
        now = time.monotonic()
        while self.events and self.events[0][0] < now - self.window:
            self.events.popleft()
        span = min(self.window, max(now - self.started, 1e-3))
        return sum(count for _, count in self.events) / span


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{key}="{escape(value)}"' for key, value in labels.items()) + "}"


class Metrics:
    """Counters, gauges and a latency histogram shared by the event loop and the worker thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.tokens = 0
        self.images = 0
        self.cancellations: dict[str, int] = defaultdict(int)
        self.batches: dict[str, int] = defaultdict(int)
        self.batch_rows: dict[str, int] = defaultdict(int)
        self._token_rate = _Rate()
        self._image_rate = _Rate()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request and its latency."""
        with self._lock:
            self.requests[(route, method, str(status))] += 1
            buckets = self.latency.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 1))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            buckets[-1] += 1
            self.latency_sum[route] += seconds

    def add_tokens(self, count: int) -> None:
        """Count generated text tokens."""
        with self._lock:
            self.tokens += count
            self._token_rate.add(count)

    def add_images(self, count: int) -> None:
        """Count generated images."""
        with self._lock:
            self.images += count
            self._image_rate.add(count)

    def cancelled(self, reason: str) -> None:
        """Count a request whose work was stopped (disconnect, timeout, shutdown)."""
        with self._lock:
            self.cancellations[reason] += 1

    def batch(self, kind: str, rows: int) -> None:
        """Count one model batch of `rows` rows."""
        with self._lock:
            self.batches[kind] += 1
            self.batch_rows[kind] += rows

    def render(self, queue_depth: int, running_rows: int) -> str:
        """The exposition text (format 0.0.4)."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("openjanus_requests_total", "counter", "HTTP requests by route, method and status.")
            for (route, method, status), count in sorted(self.requests.items()):
                out.append(f"openjanus_requests_total{_labels(route=route, method=method, status=status)} {count}")
            family("openjanus_request_duration_seconds", "histogram",
                   "Time from request to the last byte of the response (streams included).")
            for route, buckets in sorted(self.latency.items()):
                for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), buckets):
                    out.append(f"openjanus_request_duration_seconds_bucket{_labels(route=route, le=str(bound))} "
                               f"{count}")
                out.append(f"openjanus_request_duration_seconds_sum{_labels(route=route)} {self.latency_sum[route]}")
                out.append(f"openjanus_request_duration_seconds_count{_labels(route=route)} {buckets[-1]}")
            family("openjanus_queue_depth", "gauge", "Requests waiting for the model.")
            out.append(f"openjanus_queue_depth {queue_depth}")
            family("openjanus_running_rows", "gauge", "Rows (conversations or images) in the running batch.")
            out.append(f"openjanus_running_rows {running_rows}")
            family("openjanus_generated_tokens_total", "counter", "Text tokens generated.")
            out.append(f"openjanus_generated_tokens_total {self.tokens}")
            family("openjanus_generated_images_total", "counter", "Images generated.")
            out.append(f"openjanus_generated_images_total {self.images}")
            family("openjanus_tokens_per_second", "gauge", "Text tokens generated per second over the last 30 s.")
            out.append(f"openjanus_tokens_per_second {self._token_rate.per_second():.3f}")
            family("openjanus_images_per_second", "gauge", "Images generated per second over the last 30 s.")
            out.append(f"openjanus_images_per_second {self._image_rate.per_second():.3f}")
            family("openjanus_cancelled_requests_total", "counter", "Requests whose model work was stopped early.")
            for reason, count in sorted(self.cancellations.items()):
                out.append(f"openjanus_cancelled_requests_total{_labels(reason=reason)} {count}")
            family("openjanus_batches_total", "counter", "Model batches run, by kind (chat, image).")
            for kind, count in sorted(self.batches.items()):
                out.append(f"openjanus_batches_total{_labels(kind=kind)} {count}")
            family("openjanus_batch_rows_total", "counter", "Rows over all model batches, by kind.")
            for kind, count in sorted(self.batch_rows.items()):
                out.append(f"openjanus_batch_rows_total{_labels(kind=kind)} {count}")
        return "\n".join(out) + "\n"
