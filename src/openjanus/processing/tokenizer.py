"""Janus text tokenizer: a thin wrapper over a `tokenizers.Tokenizer` (tokenizer.json).

Special tokens are always looked up by their string in the loaded tokenizer, because
their ids differ between checkpoints (e.g. pad is 100002 in Janus-Pro-1B, 100015 in
Janus-Pro-7B).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

# DeepSeek-LLM sentence tokens use U+FF5C (fullwidth vertical line) and U+2581 (lower
# one-eighth block): <｜begin▁of▁sentence｜>, <｜end▁of▁sentence｜>, <｜▁pad▁｜>.
BOS_TOKEN = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS_TOKEN = "<\uff5cend\u2581of\u2581sentence\uff5c>"
PAD_TOKEN = "<\uff5c\u2581pad\u2581\uff5c>"
IMAGE_TOKEN = "<image_placeholder>"
BOI_TOKEN = "<begin_of_image>"
EOI_TOKEN = "<end_of_image>"

TOKENIZER_FILE = "tokenizer.json"

# Printed by a byte-level decoder for bytes that do not (yet) form a whole UTF-8 character.
_REPLACEMENT_CHAR = "\ufffd"


def _as_id_list(ids: Iterable[int]) -> list[int]:
    # Accept numpy / torch integers as well as plain ints.
    return [int(i) for i in ids]


class JanusTokenizer:
    """Encodes prompts and decodes model output with the checkpoint's own tokenizer.json.

    Required tokens: BOS, EOS and the three image tokens; a missing one raises `ValueError`
    naming it (the official processor would silently add `<image_placeholder>` with a new id
    beyond the trained embeddings, which we prefer to refuse). A missing pad token falls back
    to EOS, as the original Janus-1.3B processor did. Special-token strings that the vocabulary
    holds as ordinary entries are registered as special added tokens of the wrapped tokenizer,
    so that they are always matched whole in text and keep their ids.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        # Our encode must not depend on padding/truncation settings stored in tokenizer.json.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

        self.bos_id = self._require(BOS_TOKEN)
        self.eos_id = self._require(EOS_TOKEN)
        self.image_id = self._require(IMAGE_TOKEN)
        self.boi_id = self._require(BOI_TOKEN)
        self.eoi_id = self._require(EOI_TOKEN)
        pad_id = tokenizer.token_to_id(PAD_TOKEN)
        self.pad_id = self.eos_id if pad_id is None else pad_id

        present = [t for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN)
                   if tokenizer.token_to_id(t) is not None]
        added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
        missing_from_added = [t for t in present if t not in added]
        if missing_from_added:
            # An added token that already exists in the vocabulary keeps its vocabulary id.
            tokenizer.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in missing_from_added]
            )

    def _require(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token!r} token; is this a Janus tokenizer.json?")
        return token_id

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> JanusTokenizer:
        """Load a tokenizer.json (or a directory containing one)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"tokenizer file not found: {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception on bad JSON
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"cannot read tokenizer file {path}: {reason}") from None
        return cls(tokenizer)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json to `path` (a file path, or a directory to write it into)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        self._tokenizer.save(str(path))

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of `token`, or None if the vocabulary lacks it."""
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids; BOS is prepended."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        # The post-processor is bypassed so that BOS handling never depends on tokenizer.json.
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, without special tokens unless `skip_special_tokens` is False."""
        return self._tokenizer.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, ids: Iterable[int], skip_special_tokens: bool = True) -> Iterator[str]:
        """Yield the text of `ids` piece by piece as the ids arrive; pieces join to `decode(ids)`."""
        decoder = self.stream_decoder(skip_special_tokens=skip_special_tokens)
        for token_id in ids:
            piece = decoder.push(token_id)
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest


class StreamDecoder:
    """Turns a growing sequence of token ids into text pieces without splitting a character.

    A byte-level BPE token may hold only part of a multi-byte UTF-8 character (an emoji, an
    accent), so text is released only once the decoded window no longer ends in an incomplete
    character. Decoding restarts from the last released boundary each time, so the cost per
    token stays constant.
    """

    def __init__(self, tokenizer: JanusTokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: a character boundary already released
        self._read_offset = 0  # ids before this point have been released as text

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:stop], self._skip_special_tokens)

    def push(self, ids: int | Iterable[int]) -> str:
        """Append token id(s) and return the newly completed text ("" while a character is partial)."""
        try:
            self._ids.extend(_as_id_list(ids))
        except TypeError:
            self._ids.append(int(ids))
        prefix = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset)
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._release(prefix, text)

    def flush(self) -> str:
        """Release whatever text is still held back (an unfinished character becomes U+FFFD)."""
        prefix = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset)
        return self._release(prefix, text) if len(text) > len(prefix) else ""

    def _release(self, prefix: str, text: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix):]
