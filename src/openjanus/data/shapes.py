"""ShapesWorld training data generated on the fly: example `index` of a stream depends only on (seed, index).

Because an example is a pure function of its index, the position of a data stream is one
integer, which is what makes training resumable exactly and shardable across processes
without any file. Scenes are sampled on a 128 px canvas and rendered at the model's image
size (or at 128 px and resized by the image preprocessing when the model is smaller).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..worlds import shapes as world

# One random stream per purpose, so that adding a kind of data never changes another's examples.
STREAMS = {"images": 1, "captions": 2, "understanding": 3, "generation": 4, "text": 5, "caption_drop": 6,
           "evaluation": 7}
# "vqa": a question of any of the six families; a family name: questions of that family only; "caption": captions.
UNDERSTANDING_TASKS = ("caption", "vqa", *world.QUESTION_FAMILIES)
# "geneval": a prompt of any of the six tasks; a task name: prompts of that task only; "caption": dense captions.
GENERATION_PROMPTS = ("geneval", "caption", *world.TASKS)
TEXT_STYLES = ("plain", "chat")
DESCRIBE_QUESTION = "Describe the image."
SCENE_SIZE = world.MIN_SIZE


@dataclass(frozen=True)
class ConversationExample:
    """Chat messages ({'role', 'content'}) whose assistant turns are supervised, and the user's images."""

    messages: list[dict[str, str]]
    images: list[Image.Image] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationExample:
    """A text-to-image pair."""

    prompt: str
    image: Image.Image


@dataclass(frozen=True)
class TextExample:
    """Plain text, supervised on every token."""

    text: str


def example_rng(seed: int, stream: str, index: int, split: str = "train") -> np.random.Generator:
    """The random generator of one example: a pure function of (split, seed, stream, index)."""
    return np.random.default_rng([world.SPLIT_SEEDS[split], seed, STREAMS[stream], index])


def render_scene(scene: world.Scene, image_size: int) -> Image.Image:
    """Render at the model's size when ShapesWorld allows it, else at 128 px (preprocessing resizes)."""
    valid = image_size >= world.MIN_SIZE and image_size % 16 == 0
    return world.render(scene, image_size if valid else None)


def choose(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
    """A key of `weights` drawn with probability proportional to its weight."""
    names = list(weights)
    probabilities = np.array([weights[name] for name in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=probabilities / probabilities.sum()))]


def scene_with_question(rng: np.random.Generator, family: str | None = None) -> tuple[world.Scene, world.Question]:
    """A random scene and a question of `family` (uniform over families when None) it can answer."""
    family = family or world.QUESTION_FAMILIES[int(rng.integers(len(world.QUESTION_FAMILIES)))]
    while True:
        scene = world.sample_scene(rng, SCENE_SIZE)
        question = world.sample_question(rng, scene, family)
        if question is not None:
            return scene, question


class ShapesImages:
    """Scene renders for the VQ tokenizer, optionally as random square crops."""

    def __init__(self, seed: int, image_size: int, crop_size: int = 0, split: str = "train"):
        self.seed, self.image_size, self.crop_size, self.split = seed, image_size, crop_size, split

    def __getitem__(self, index: int) -> Image.Image:
        rng = example_rng(self.seed, "images", index, self.split)
        image = render_scene(world.sample_scene(rng, SCENE_SIZE), self.image_size)
        if image.size[0] != self.image_size:
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        if self.crop_size and self.crop_size < self.image_size:
            x, y = (int(v) for v in rng.integers(0, self.image_size - self.crop_size + 1, size=2))
            image = image.crop((x, y, x + self.crop_size, y + self.crop_size))
        return image


class ShapesCaptions:
    """(image, dense caption) pairs for contrastive training of the understanding encoder."""

    def __init__(self, seed: int, image_size: int, split: str = "train"):
        self.seed, self.image_size, self.split = seed, image_size, split

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        scene = world.sample_scene(example_rng(self.seed, "captions", index, self.split), SCENE_SIZE)
        return render_scene(scene, self.image_size), world.caption(scene)


class ShapesUnderstanding:
    """Chat-formatted questions about a scene: dense captions ("caption") and shapes-VQA ("vqa", or one family)."""

    def __init__(self, seed: int, image_size: int, tasks: Mapping[str, float], split: str = "train"):
        self.seed, self.image_size, self.tasks, self.split = seed, image_size, dict(tasks), split

    def __getitem__(self, index: int) -> ConversationExample:
        rng = example_rng(self.seed, "understanding", index, self.split)
        task = choose(rng, self.tasks)
        if task == "caption":
            scene = world.sample_scene(rng, SCENE_SIZE)
            question, answer = DESCRIBE_QUESTION, world.caption(scene)
        else:
            scene, asked = scene_with_question(rng, None if task == "vqa" else task)
            question, answer = asked.text, asked.answer
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return ConversationExample(messages, [render_scene(scene, self.image_size)])


class ShapesGeneration:
    """Text-to-image pairs: shapes-GenEval prompts ("geneval", or one task by name) or dense captions ("caption")."""

    def __init__(self, seed: int, image_size: int, prompts: Mapping[str, float], split: str = "train"):
        self.seed, self.image_size, self.prompts, self.split = seed, image_size, dict(prompts), split

    def __getitem__(self, index: int) -> GenerationExample:
        rng = example_rng(self.seed, "generation", index, self.split)
        source = choose(rng, self.prompts)
        if source == "caption":
            scene = world.sample_scene(rng, SCENE_SIZE)
            text = world.caption(scene)
        else:
            task = world.TASKS[int(rng.integers(len(world.TASKS)))] if source == "geneval" else source
            prompt = world.sample_prompt(rng, task)
            scene, text = world.scene_for_prompt(rng, prompt, SCENE_SIZE), prompt.text
        return GenerationExample(text, render_scene(scene, self.image_size))


class ShapesText:
    """The ShapesWorld text corpus: captions, prompts and caption-grounded questions with answers.

    "plain" examples are raw text for language-model pretraining; "chat" examples put a caption and a
    question in a user turn and the answer in the assistant turn, for supervised fine-tuning.
    """

    def __init__(self, seed: int, style: str = "plain", split: str = "train"):
        if style not in TEXT_STYLES:
            raise ValueError(f"text style must be one of {TEXT_STYLES}, got {style!r}")
        self.seed, self.style, self.split = seed, style, split

    def __getitem__(self, index: int) -> TextExample | ConversationExample:
        rng = example_rng(self.seed, "text", index, self.split)
        scene, question = scene_with_question(rng)
        description = world.caption(scene)
        if self.style == "chat":
            return ConversationExample([{"role": "user", "content": f"{description} {question.text}"},
                                        {"role": "assistant", "content": question.answer}])
        kind = int(rng.integers(3))
        if kind == 0:
            return TextExample(description)
        if kind == 1:
            task = world.TASKS[int(rng.integers(len(world.TASKS)))]
            return TextExample(world.sample_prompt(rng, task).text)
        return TextExample(f"{description} {question.text} {question.answer}")
