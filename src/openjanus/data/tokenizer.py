"""A byte-level BPE tokenizer trained in code on the ShapesWorld corpus, with every Janus special token.

Every byte stays encodable (the 256-byte alphabet is always kept), so any user text works;
the merges make the ShapesWorld words, chat roles and the default system prompt short.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from ..processing.chat import DEFAULT_SYSTEM_PROMPT, chat_format_for
from ..processing.tokenizer import (
    BOI_TOKEN,
    BOS_TOKEN,
    EOI_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    TOKENIZER_FILE,
    JanusTokenizer,
)
from ..worlds import shapes as world
from .shapes import DESCRIBE_QUESTION, example_rng

SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN,
                  *(role for fmt in ("deepseek", "deepseek_old")
                    for role in (chat_format_for(fmt).user_role, chat_format_for(fmt).assistant_role))]
CORPUS_SCENES = 300


def shapes_corpus(num_scenes: int = CORPUS_SCENES, seed: int = 0) -> list[str]:
    """Every kind of ShapesWorld text: prompts of all tasks, captions, questions and answers, chat strings."""
    lines = [DEFAULT_SYSTEM_PROMPT, DESCRIBE_QUESTION, "yes", "no", *world.COLORS, *world.SHAPES]
    lines += [str(n) for n in range(10)]
    for index in range(num_scenes):
        rng = example_rng(seed, "text", index, split="validation")
        scene = world.sample_scene(rng, world.MIN_SIZE)
        lines.append(world.caption(scene))
        lines += [f"{q.text} {q.answer}" for q in world.questions_for_scene(rng, scene)]
        lines += [world.sample_prompt(rng, task).text for task in world.TASKS]
    for color, shape in itertools.product(world.COLORS, world.SHAPES):
        lines.append(f"a photo of {world.with_article(f'{color} {shape}')}")
    return lines


def build_shapes_tokenizer(vocab_size: int, path: str | os.PathLike | None = None) -> JanusTokenizer:
    """Train the ShapesWorld tokenizer (at most `vocab_size` ids) and optionally save it as tokenizer.json."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"tokenizer vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(shapes_corpus(), trainer=trainer)
    # Registered as added special tokens too, so they always match whole in text.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if path is not None:
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tokenizer.save(str(tmp))
        os.replace(tmp, path)
    return JanusTokenizer(tokenizer)
