"""A tiny, deterministic Janus-style byte-level BPE tokenizer trained in code, for tests.

Special tokens use the real Janus strings but deliberately different ids and order
(BOS is not 100000, pad is not BOS + 2), so code that hard-codes ids fails here.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from openjanus.processing.chat import chat_format_for
from openjanus.processing.tokenizer import (
    BOI_TOKEN,
    BOS_TOKEN,
    EOI_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    TOKENIZER_FILE,
)

USER_TOKEN = chat_format_for("deepseek").user_role  # "<|User|>"
ASSISTANT_TOKEN = chat_format_for("deepseek").assistant_role  # "<|Assistant|>"
VOCAB_SIZE = 400  # before the added tokens

_COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
_SHAPES = ["circle", "square", "triangle", "star"]
_RELATIONS = ["left of", "right of", "above", "below"]


def _corpus() -> list[str]:
    """A few hundred lines of simple English about coloured shapes, digits and yes/no."""
    lines = []
    for color, shape in itertools.product(_COLORS, _SHAPES):
        lines += [
            f"a photo of a {color} {shape}",
            f"What color is the {shape}?",
            f"The {shape} is {color}.",
            f"Is there a {color} {shape}? yes",
            f"Is there a {color} {shape}? no",
        ]
    objects = list(zip(_COLORS, _SHAPES * 2, strict=True))
    for (c1, s1), relation, (c2, s2) in itertools.product(objects, _RELATIONS, objects[::3]):
        lines.append(f"a {c1} {s1} {relation} a {c2} {s2}")
    lines += [f"How many shapes are there? {n}" for n in range(10)]
    lines += [f"There are {n} {shape}s." for n in range(10) for shape in _SHAPES]
    lines += ["Describe the image.", "Yes.", "No.", "Hello!", "Hi, how are you?"]
    return lines


def build_tiny_tokenizer(path_or_dir: str | os.PathLike, include_pad: bool = True) -> Tokenizer:
    """Train the tiny tokenizer and save it as tokenizer.json (in a directory, or at a .json path)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN, BOS_TOKEN],  # EOS first: ids 0 and 1, unlike the real 100001/100000
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable (emoji, accents)
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)

    # Added after training, like the real checkpoints, in a shuffled order.
    extra = [USER_TOKEN, ASSISTANT_TOKEN, IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN]
    if include_pad:
        extra.insert(3, PAD_TOKEN)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in extra])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # A BOS-prepending post-processor like the real one (openjanus bypasses it; the HF oracle uses it).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )

    path = Path(path_or_dir)
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / TOKENIZER_FILE
    tokenizer.save(str(path))
    return tokenizer


def build_hf_tokenizer(directory: str | os.PathLike):
    """Build the tiny tokenizer as a transformers `PreTrainedTokenizerFast` and save it to `directory`."""
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tiny_tokenizer(directory),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # JanusProcessor reads these attribute names (reference §12).
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN},
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer
