"""Request bodies of the OpenAI-compatible routes (they also make the app's OpenAPI schema).

Unknown OpenAI fields are ignored, as OpenAI-compatible servers do; fields that would change
the answer but are not supported (tools, logprobs, n > 1 for chat) are refused by the routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ImageURL(_Body):
    """An image reference: a base64 `data:` URL, or an http(s) URL when the server allows remote images."""

    url: str = Field(min_length=1)
    detail: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    """POST /v1/chat/completions (top_k is an extension)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    user: str | None = None


class ImageGenerationRequest(_Body):
    """POST /v1/images/generations (guidance_scale, seed, temperature, top_k, top_p are extensions)."""

    model: str | None = None
    prompt: str = Field(min_length=1, max_length=32_000)
    n: int | None = Field(None, ge=1)
    size: str | None = None
    response_format: str | None = None
    guidance_scale: float | None = Field(None, ge=0, le=100)
    cfg_weight: float | None = Field(None, ge=0, le=100)
    temperature: float | None = Field(None, ge=0, le=2)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    user: str | None = None
