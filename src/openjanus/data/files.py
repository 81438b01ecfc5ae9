"""Data from JSON or JSON Lines files, for training on real data with the same code path as ShapesWorld.

A file is either JSON Lines (one record a line) or one JSON array of records (LLaVA's `.json`);
each record's kind is told by its keys:

- conversations (LLaVA style): {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}, or "messages" with {"role", "content"}; several images as
  "images": [...], one `<image>` marker each (in user turns, in order); no marker puts the images
  before the first question; no image for text-only chat;
- text-to-image (metadata.jsonl style): {"file_name" or "image": "a.png", "text" or "caption": "..."};
- plain text: {"text": "..."}.

Relative image paths start at the image root (default: the data file's directory). Every record
is checked before training (`scan_data_file`): its JSON, its keys, its markers against its
images, and that each image exists and opens. A bad record stops the run with its file and
line, or, with `skip_bad`, is left out and counted.

Example `index` is usable record `perm[index % n]` of a permutation drawn per pass from
(seed, pass), so the data position stays a single integer.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..processing.image import load_image
from ..processing.tokenizer import IMAGE_TOKEN
from .shapes import ConversationExample, GenerationExample, TextExample

IMAGE_MARKER = "<image>"  # LLaVA's marker; `<image_placeholder>` is accepted as well
SHOWN_BAD_RECORDS = 3
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# What a file listed under each mixture kind may hold.
_ALLOWED = {"understanding": ("conversation",), "text": ("conversation", "text"), "generation": ("pair",)}
_RECORD_NAMES = {"conversation": "a conversation", "text": "plain text", "pair": "an image-text pair"}


class DataError(ValueError):
    """A data file or record that cannot be trained on; the message names the file and line."""


def check_data_file(path: str | Path) -> Path:
    """The path of an existing data file, or FileNotFoundError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


@dataclass(frozen=True)
class BadRecord:
    """A record left out, and why."""

    line: int
    problem: str


@dataclass(frozen=True)
class ParsedRecord:
    """A checked record before its images are loaded: `body` is the messages, the prompt or the text."""

    type: str  # conversation | pair | text
    body: Any
    images: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DataIndex:
    """The usable records of a data file, where to read each, and the records left out."""

    path: Path
    image_root: Path
    lines: np.ndarray  # 1-based line of every usable record
    offsets: np.ndarray | None  # JSON Lines: byte offset of every usable record
    texts: list[bytes] | None  # JSON array: the text of every usable record
    bad: list[BadRecord]

    def __len__(self) -> int:
        return len(self.lines)

    def skipped_summary(self) -> str:
        """One line: how many records were skipped, and the first few with their lines."""
        shown = "; ".join(f"line {b.line}: {b.problem}" for b in self.bad[:SHOWN_BAD_RECORDS])
        more = f"; and {len(self.bad) - SHOWN_BAD_RECORDS} more" if len(self.bad) > SHOWN_BAD_RECORDS else ""
        return (f"{self.path}: skipped {len(self.bad)} bad record(s) of {len(self.bad) + len(self)} "
                f"({shown}{more})")


def parse_record(record: Any) -> ParsedRecord:
    """Check one record's structure; ValueError says what is wrong (without the file and line)."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if "conversations" in record or "messages" in record:
        return _parse_conversation(record)
    image = record.get("file_name", record.get("image"))
    if image is not None:
        text = record.get("text", record.get("caption"))
        if not isinstance(text, str):
            raise ValueError("an image-text pair needs a string 'text' or 'caption'")
        return ParsedRecord("pair", text, [_image_name(image, "file_name" if "file_name" in record else "image")])
    if isinstance(record.get("text"), str):
        return ParsedRecord("text", record["text"])
    raise ValueError("a record needs 'conversations' or 'messages', an image with 'text' or 'caption', "
                     "or a string 'text'")


def _image_name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"'{key}' must be a non-empty string (an image path), got {value!r}")
    return value


def _parse_conversation(record: dict) -> ParsedRecord:
    if "conversations" in record and "messages" in record:
        raise ValueError("give 'conversations' or 'messages', not both")
    key = "conversations" if "conversations" in record else "messages"
    role_key, text_key = ("from", "value") if key == "conversations" else ("role", "content")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{key}' must be a non-empty list of turns")
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get(role_key) not in _ROLES or not isinstance(turn.get(text_key), str):
            raise ValueError(f"{key}[{number}] must be {{'{role_key}': one of {', '.join(_ROLES)}, "
                             f"'{text_key}': text}}")
        content = turn[text_key].replace(IMAGE_MARKER, IMAGE_TOKEN)
        if IMAGE_TOKEN in content and _ROLES[turn[role_key]] != "user":
            raise ValueError(f"{key}[{number}]: only user turns may hold {IMAGE_MARKER} markers")
        messages.append({"role": _ROLES[turn[role_key]], "content": content})
    if messages[-1]["role"] != "assistant":
        raise ValueError("a conversation must end with an assistant answer")
    if "image" in record and "images" in record:
        raise ValueError("give 'image' or 'images', not both")
    if isinstance(record.get("images"), list):
        images = [_image_name(name, f"images[{i}]") for i, name in enumerate(record["images"])]
    elif "images" in record:
        raise ValueError(f"'images' must be a list of image paths, got {record['images']!r}")
    else:
        images = [] if record.get("image") is None else [_image_name(record["image"], "image")]
    markers = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if markers and markers != len(images):
        raise ValueError(f"{markers} {IMAGE_MARKER} marker(s) for {len(images)} image(s)")
    return ParsedRecord("conversation", messages, images)


def check_image(path: Path) -> None:
    """ValueError unless `path` is an image file Pillow opens and verifies (header, size, data checksums)."""
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                if min(image.size) <= 0:
                    raise ValueError(f"image {path} has zero size {image.size}")
                image.verify()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(f"image {path} is too large to decode safely") from None
        except UnidentifiedImageError:
            raise ValueError(f"unreadable image {path}: not a recognised image") from None
        except (OSError, SyntaxError, EOFError) as error:
            raise ValueError(f"unreadable image {path}: {error}") from None


def _json_lines(path: Path):
    """(line, byte offset, raw bytes) of every non-blank line."""
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if raw.strip():
                yield number, offset, raw
            offset += len(raw)


def _json_array(path: Path, text: str):
    """(line, record text) of every element of a JSON array; a syntax error stops with its line."""
    decoder, position, line = json.JSONDecoder(), 0, 1

    def skip_space(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    position = skip_space(position) + 1  # past "["
    position = skip_space(position)
    if text[position:position + 1] == "]":
        return
    counted = 0
    while True:
        line += text.count("\n", counted, position)
        counted = position
        try:
            _, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg}); "
                            "a JSON array cannot be read past it") from None
        yield line, text[position:end]
        position = skip_space(end)
        if text[position:position + 1] == ",":
            position = skip_space(position + 1)
        elif text[position:position + 1] == "]" and not text[position + 1:].strip():
            return
        else:
            where = line + text.count("\n", counted, position)
            raise DataError(f"{path} line {where}: malformed JSON (expected ',' or the closing ']')")


def scan_data_file(path: str | Path, kind: str | None = None, image_root: str | Path | None = None,
                   skip_bad: bool = False) -> DataIndex:
    """Check every record of a data file (and its images): DataError on the first bad one, or skip them all.

    `kind` (understanding, text or generation) restricts the records to those its stream can use.
    Scans are cached per file version, so the checks before training are not repeated by the datasets.
    """
    path = check_data_file(path).resolve()
    root = Path(image_root).expanduser().resolve() if image_root else path.parent
    if not root.is_dir():
        raise DataError(f"image root not found: {root}")
    stat = path.stat()
    return _scan(path, stat.st_mtime_ns, stat.st_size, kind, root, skip_bad)


@functools.lru_cache(maxsize=32)
def _scan(path: Path, _mtime: int, _size: int, kind: str | None, root: Path, skip_bad: bool) -> DataIndex:
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    is_array = head.startswith(b"[") or head.startswith(b"\xef\xbb\xbf[")
    if is_array:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        entries = ((line, None, raw.encode()) for line, raw in _json_array(path, text))
    else:
        entries = _json_lines(path)
    images: dict[str, str | None] = {}  # image path -> problem (None when fine), checked once per file
    lines, offsets, texts, bad = [], [], [], []
    for line, offset, raw in entries:
        try:
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"malformed JSON ({getattr(exc, 'msg', exc)})") from None
            parsed = parse_record(record)
            if kind is not None and parsed.type not in _ALLOWED[kind]:
                wanted = " or ".join(_RECORD_NAMES[t] for t in _ALLOWED[kind])
                raise ValueError(f"{kind} data needs {wanted} per record, got {_RECORD_NAMES[parsed.type]}")
            for name in parsed.images:
                if name not in images:
                    try:
                        check_image(root / name)
                        images[name] = None
                    except ValueError as exc:
                        images[name] = str(exc)
                if images[name] is not None:
                    raise ValueError(images[name])
        except ValueError as exc:
            bad.append(BadRecord(line, str(exc)))
            continue
        lines.append(line)
        (texts if is_array else offsets).append(raw if is_array else offset)
    if bad and not skip_bad:
        first = bad[0]
        more = f" ({len(bad)} bad records in all)" if len(bad) > 1 else ""
        raise DataError(f"{path} line {first.line}: {first.problem}{more}; fix the data or skip bad records "
                        "with --skip-bad (data.skip_bad)")
    if not lines:
        raise DataError(f"data file {path} has no usable records" + (f" ({len(bad)} bad)" if bad else ""))
    return DataIndex(path, root, np.array(lines, dtype=np.int64),
                     None if is_array else np.array(offsets, dtype=np.int64), texts if is_array else None, bad)


class JsonlDataset:
    """Examples read lazily from a checked JSON Lines or JSON file (see `scan_data_file`)."""

    def __init__(self, path: str | Path, seed: int = 0, kind: str | None = None,
                 image_root: str | Path | None = None, skip_bad: bool = False):
        self.index = scan_data_file(path, kind, image_root, skip_bad)
        self.path, self.seed = self.index.path, seed
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _position(self, index: int) -> int:
        epoch, position = divmod(index, len(self.index))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.index)))
        return int(self._order[1][position])

    def _raw(self, position: int) -> bytes:
        if self.index.texts is not None:
            return self.index.texts[position]
        with self.path.open("rb") as handle:
            handle.seek(int(self.index.offsets[position]))
            return handle.readline()

    def __getitem__(self, index: int) -> ConversationExample | GenerationExample | TextExample:
        position = self._position(index)
        try:
            parsed = parse_record(json.loads(self._raw(position)))
            images = [load_image(self.index.image_root / name) for name in parsed.images]
        except ValueError as exc:  # the file or an image changed since it was checked
            raise DataError(f"{self.path} line {self.index.lines[position]}: {exc}") from None
        if parsed.type == "conversation":
            return ConversationExample(parsed.body, images)
        if parsed.type == "pair":
            return GenerationExample(parsed.body, images[0])
        return TextExample(parsed.body)
