"""Server settings: what `openjanus serve` flags set, with safe defaults and validation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    """Limits and switches of one server; every limit is enforced per request."""

    model_id: str = "janus"
    api_key: str | None = None  # bearer token required on every route but /health and the page
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: only base64 data: URLs)
    cors_origins: tuple[str, ...] = ()  # CORS stays off while empty
    max_queue: int = 16  # requests waiting for the model; one more gets 429
    request_timeout: float = 300.0  # seconds from arrival until a request is cancelled
    max_batch_size: int = 8  # conversations decoded in one batch
    max_image_rows: int = 8  # images generated in one batch
    max_images_per_request: int = 8  # `n` of /v1/images/generations
    default_max_tokens: int = 512  # when a chat request gives no max_tokens (capped by the limit)
    max_tokens_limit: int = 2048  # largest max_tokens accepted
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 16 * 1024 * 1024  # one encoded input image
    max_image_pixels: int = 4096 * 4096  # one decoded input image, checked before decoding
    max_input_images: int = 4  # images in one chat request
    remote_image_timeout: float = 10.0
    batch_wait: float = 0.005  # seconds the scheduler waits for more requests to batch with
    retry_after: int = 1  # Retry-After seconds on 429

    def __post_init__(self):
        positive = ("max_queue", "request_timeout", "max_batch_size", "max_image_rows", "max_images_per_request",
                    "default_max_tokens", "max_tokens_limit", "max_body_bytes", "max_image_bytes",
                    "max_image_pixels", "max_input_images", "remote_image_timeout", "retry_after")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_wait < 0:
            raise ValueError(f"batch_wait must be >= 0, got {self.batch_wait}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty")
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
