"""Janus chat prompts: the official "deepseek" SFT template, rendered exactly.

Rules (official `Conversation.get_prompt` with the DeepSeek separator style): the i-th
message is rendered as `ROLE + ": " + content.strip()` followed by "\\n\\n" for even i (user
turns) and the EOS string for odd i (assistant turns); an empty message renders as
`ROLE + ":"` with no separator; a non-empty system prompt is prepended followed by "\\n\\n";
the whole string is stripped. The tokenizer prepends BOS afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .tokenizer import BOI_TOKEN, EOS_TOKEN

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)

USER_SEPARATOR = "\n\n"
ASSISTANT_SEPARATOR = EOS_TOKEN


@dataclass(frozen=True)
class ChatFormat:
    """The role strings written into prompts (the official code takes them from the caller)."""

    user_role: str
    assistant_role: str


_SFT_FORMATS = {
    "deepseek": ChatFormat(user_role="<|User|>", assistant_role="<|Assistant|>"),  # Janus-Pro
    "deepseek_old": ChatFormat(user_role="User", assistant_role="Assistant"),  # Janus-1.3B
}


def chat_format_for(sft_format: str) -> ChatFormat:
    """Roles for a processor_config.json `sft_format` ("deepseek" or "deepseek_old")."""
    try:
        return _SFT_FORMATS[sft_format]
    except KeyError:
        known = ", ".join(repr(name) for name in _SFT_FORMATS)
        raise ValueError(f"unknown sft_format {sft_format!r}; expected one of {known}") from None


def _turns(messages: Sequence[Mapping[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """Validate `messages`; return (system override or None, [(role, stripped content), ...])."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    system = None
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TypeError(f"message {index} must be a dict with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if not isinstance(content, str):
            raise TypeError(f"message {index} content must be a str, got {type(content).__name__}")
        if role == "system":
            if index != 0:
                raise ValueError(f"message {index}: a system message is only allowed first")
            system = content.strip()
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"message {index} has role {role!r}, expected {expected!r} "
                "(roles must alternate user/assistant, starting with user)"
            )
        turns.append((role, content.strip()))
    if not turns:
        raise ValueError("conversation has no user message")
    return system, turns


def render_conversation(
    messages: Sequence[Mapping[str, str]],
    fmt: ChatFormat,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """Render a conversation as the official prompt text, ending with "ASSISTANT:" for generation.

    Messages are {"role": "user" | "assistant" | "system", "content": str}; an optional
    leading system message replaces `system_prompt`. Turns must alternate user/assistant,
    starting with a user turn, and may end with a user turn or an empty assistant turn.
    """
    system, turns = _turns(messages)
    if system is not None:
        system_prompt = system
    if turns[-1][0] == "user":
        turns.append(("assistant", ""))
    for index, (role, content) in enumerate(turns[:-1]):
        if not content:
            # The official template would glue this role onto the next one.
            raise ValueError(f"{role} turn {index} is empty; only the final assistant turn may be")
    if turns[-1][1]:
        raise ValueError("the last assistant turn must be empty so the prompt is ready for generation")

    roles = {"user": fmt.user_role, "assistant": fmt.assistant_role}
    text = system_prompt + USER_SEPARATOR if system_prompt else ""
    for index, (role, content) in enumerate(turns):
        if content:
            separator = USER_SEPARATOR if index % 2 == 0 else ASSISTANT_SEPARATOR
            text += f"{roles[role]}: {content}{separator}"
        else:
            text += f"{roles[role]}:"
    return text.strip()


def image_generation_prompt(text: str, fmt: ChatFormat) -> str:
    """The text-to-image prompt: one user turn, no system prompt, ending with <begin_of_image>."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("image prompt is empty")
    return render_conversation([{"role": "user", "content": text}], fmt, system_prompt="") + BOI_TOKEN
