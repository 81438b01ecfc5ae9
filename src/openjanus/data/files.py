"""Data from JSON Lines files, for training on real data with the same code path as ShapesWorld.

One example per line, its kind told by its keys; relative image paths are resolved against the
file's directory.

- conversations (LLaVA style): {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}, or "messages" with {"role", "content"}; no image for text-only chat;
- text-to-image (metadata.jsonl style): {"file_name" or "image": "a.png", "text" or "caption": "..."};
- plain text: {"text": "..."}.

Example `index` is line `perm[index % n]` of a permutation drawn per pass from (seed, pass), so
the data position stays a single integer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..processing.image import load_image
from ..processing.tokenizer import IMAGE_TOKEN
from .shapes import ConversationExample, GenerationExample, TextExample

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def check_data_file(path: str | Path) -> Path:
    """The path of an existing data file, or FileNotFoundError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


class JsonlDataset:
    """Examples read lazily from a JSON Lines file."""

    def __init__(self, path: str | Path, seed: int = 0):
        self.path, self.seed = check_data_file(path), seed
        offsets, position = [], 0
        with self.path.open("rb") as handle:
            for line in handle:
                if line.strip():
                    offsets.append(position)
                position += len(line)
        if not offsets:
            raise ValueError(f"data file {self.path} has no examples")
        self.offsets = np.array(offsets, dtype=np.int64)
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def _line(self, index: int) -> int:
        epoch, position = divmod(index, len(self.offsets))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.offsets)))
        return int(self._order[1][position])

    def __getitem__(self, index: int) -> ConversationExample | GenerationExample | TextExample:
        line = self._line(index)
        with self.path.open("rb") as handle:
            handle.seek(int(self.offsets[line]))
            raw = handle.readline()
        try:
            record = json.loads(raw)
            return self._example(record)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path} line {line + 1}: not a valid training record ({exc})") from None

    def _image(self, name: str):
        return load_image(self.path.parent / name)

    def _example(self, record: dict):
        if "messages" not in record and "conversations" not in record:
            image = record.get("file_name", record.get("image"))
            if image is None:
                return TextExample(str(record["text"]))
            return GenerationExample(str(record.get("text", record.get("caption"))), self._image(image))
        if "messages" in record:
            messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        else:
            messages = [{"role": _ROLES[m["from"]], "content": m["value"].replace("<image>", IMAGE_TOKEN)}
                        for m in record["conversations"]]
        images = [self._image(record["image"])] if record.get("image") else []
        return ConversationExample(messages, images)
