"""Untrusted request content made safe for the pipeline: images decoded under limits, prompts checked.

Everything here runs in a worker thread of the event loop's pool (never on the loop itself),
before a request is queued, so that bad input is refused with a 400 and never reaches a batch.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from typing import Any

from PIL import Image

from ..processing.chat import image_generation_prompt, render_conversation
from ..processing.inputs import normalize_message
from ..processing.tokenizer import BOI_TOKEN, BOS_TOKEN, EOI_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN
from .errors import ServeError, bad_request
from .schemas import ChatMessage
from .settings import ServeSettings

SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN)


def check_text(text: str, param: str) -> None:
    """Refuse text that smuggles the model's special tokens (they would break the prompt's image slots)."""
    for token in SPECIAL_TOKENS:
        if token in text:
            raise bad_request(f"{param} must not contain the special token {token!r}", param=param)


def open_image(data: bytes, settings: ServeSettings) -> Image.Image:
    """An RGB image from encoded bytes; size and pixel limits are checked before any pixel is decoded."""
    if len(data) > settings.max_image_bytes:
        raise bad_request(f"an image is {len(data)} bytes; the limit is {settings.max_image_bytes}",
                          code="image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    raise bad_request(f"an image has zero size ({width}x{height})")
                if width * height > settings.max_image_pixels:
                    raise bad_request(f"an image is {width}x{height} pixels; the limit is "
                                      f"{settings.max_image_pixels} pixels", code="image_too_large")
                return image.convert("RGB")
    except ServeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bad_request("an image has too many pixels to decode safely",
                          code="image_too_large") from None
    except Exception:  # Pillow raises many types on hostile data; none of them is our failure
        raise bad_request("an image could not be decoded (send PNG, JPEG, GIF or WebP data)",
                          code="invalid_image") from None


def _fetch(url: str, settings: ServeSettings) -> bytes:
    # Only http(s), redirects included: no file:, ftp: or data: handlers, and no proxies from the environment.
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    urllib.request.HTTPRedirectHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    request = urllib.request.Request(url, headers={"User-Agent": "openjanus", "Accept": "image/*"})
    try:
        with opener.open(request, timeout=settings.remote_image_timeout) as response:
            data = response.read(settings.max_image_bytes + 1)
    except urllib.error.HTTPError as error:
        raise bad_request(f"fetching image_url failed with HTTP {error.code}", code="image_fetch_failed") from None
    except Exception:
        raise bad_request("image_url could not be fetched", code="image_fetch_failed") from None
    return data


def load_image_url(url: str, settings: ServeSettings) -> Image.Image:
    """Decode a base64 `data:` URL, or fetch an http(s) URL when the server allows remote images."""
    if url[:5].lower() == "data:":
        header, comma, payload = url.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise bad_request("image data URLs must be base64: data:image/png;base64,...", code="invalid_image")
        if len(payload) > settings.max_image_bytes * 4 // 3 + 8:
            raise bad_request(f"an image is larger than {settings.max_image_bytes} bytes", code="image_too_large")
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("an image data URL is not valid base64", code="invalid_image") from None
        return open_image(data, settings)
    if url[:7].lower() == "http://" or url[:8].lower() == "https://":
        if not settings.allow_remote_images:
            raise bad_request("remote image URLs are disabled on this server: send the image as a base64 data: "
                              "URL (the server can allow them with --allow-remote-images)",
                              code="remote_images_disabled")
        return open_image(_fetch(url, settings), settings)
    raise bad_request("image_url must be a base64 data: URL or an http(s) URL", code="invalid_image")


def to_conversation(messages: Sequence[ChatMessage], settings: ServeSettings) -> list[dict[str, Any]]:
    """OpenAI chat messages as a pipeline conversation, with images decoded to PIL."""
    conversation: list[dict[str, Any]] = []
    images = 0
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None:
            raise bad_request(f"messages[{index}] has no content", param=f"messages.{index}.content")
        if isinstance(content, str):
            check_text(content, f"messages.{index}.content")
            conversation.append({"role": role, "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if part.type == "text":
                check_text(part.text, f"messages.{index}.content")
                parts.append({"type": "text", "text": part.text})
                continue
            if role != "user":
                raise bad_request(f"messages[{index}]: only user messages may carry images",
                                  param=f"messages.{index}.content")
            images += 1
            if images > settings.max_input_images:
                raise bad_request(f"a request may carry at most {settings.max_input_images} images",
                                  code="too_many_images")
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            parts.append({"type": "image", "image": load_image_url(url, settings)})
        conversation.append({"role": role, "content": parts})
    return conversation


def count_prompt_tokens(pipe, conversation: Sequence[dict[str, Any]]) -> int:
    """Prompt length in tokens (images expanded) as the pipeline will build it; refuses invalid conversations."""
    try:
        messages, images = [], 0
        for index, message in enumerate(conversation):
            text_message, message_images = normalize_message(message, index)
            messages.append(text_message)
            images += len(message_images)
        ids = pipe.tokenizer.encode(render_conversation(messages, pipe.chat_format))
    except (ValueError, TypeError) as error:
        raise bad_request(str(error), param="messages") from None
    tokens = len(ids) + images * (pipe.config.vision.num_patches + 1)
    context = pipe.config.llm.context_length
    if tokens >= context:
        raise bad_request(f"the prompt is {tokens} tokens; the model's context is {context}",
                          param="messages", code="context_length_exceeded")
    return tokens


def check_image_prompt(pipe, prompt: str) -> None:
    """Refuse image prompts the pipeline cannot take (empty, special tokens, too long for the context)."""
    check_text(prompt, "prompt")
    try:
        tokens = len(pipe.tokenizer.encode(image_generation_prompt(prompt, pipe.chat_format)))
    except (ValueError, TypeError) as error:
        raise bad_request(str(error), param="prompt") from None
    needed = tokens + pipe.config.num_image_tokens
    if needed > pipe.config.llm.context_length:
        raise bad_request(f"the prompt is too long: {tokens} tokens + {pipe.config.num_image_tokens} image "
                          f"tokens exceed the model's context of {pipe.config.llm.context_length}",
                          param="prompt", code="context_length_exceeded")


def png_base64(image: Image.Image) -> str:
    """An image as base64-encoded PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
