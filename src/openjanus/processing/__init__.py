"""Text and image processing: tokenizer, chat prompts, image pre/post-processing."""

from .chat import (
    DEFAULT_SYSTEM_PROMPT,
    ChatFormat,
    chat_format_for,
    image_generation_prompt,
    render_conversation,
)
from .image import load_image, preprocess_image, preprocess_images, tensor_to_pil
from .tokenizer import (
    BOI_TOKEN,
    BOS_TOKEN,
    EOI_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    JanusTokenizer,
    StreamDecoder,
)

__all__ = [
    "BOI_TOKEN",
    "BOS_TOKEN",
    "DEFAULT_SYSTEM_PROMPT",
    "EOI_TOKEN",
    "EOS_TOKEN",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "ChatFormat",
    "JanusTokenizer",
    "StreamDecoder",
    "chat_format_for",
    "image_generation_prompt",
    "load_image",
    "preprocess_image",
    "preprocess_images",
    "render_conversation",
    "tensor_to_pil",
]
