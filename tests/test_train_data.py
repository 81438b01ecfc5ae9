"""Training data: the ShapesWorld tokenizer, deterministic streams, answer-only masks, caption drop, mixtures."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from openjanus.data import (
    IGNORE_INDEX,
    ConversationExample,
    GenerationExample,
    JsonlDataset,
    Mixture,
    ShapesGeneration,
    ShapesImages,
    ShapesUnderstanding,
    TextExample,
    build_shapes_tokenizer,
    collate,
    encode_conversation,
    encode_generation,
    encode_text,
)
from openjanus.data.shapes import DESCRIBE_QUESTION
from openjanus.data.tokenizer import SPECIAL_TOKENS
from openjanus.generation import unconditional_ids
from openjanus.processing.chat import chat_format_for
from openjanus.processing.inputs import generation_batch, understanding_batch
from openjanus.worlds import shapes as world

FMT = chat_format_for("deepseek")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_shapes_tokenizer(512, tmp_path_factory.mktemp("tok"))


def test_shapes_tokenizer_has_every_janus_token_and_short_shapes_words(tokenizer):
    assert tokenizer.vocab_size <= 512
    for token in SPECIAL_TOKENS:
        assert tokenizer.token_to_id(token) is not None
    sentence = "a photo of an orange triangle left of a purple square"
    ids = tokenizer.encode(sentence, add_bos=False)
    assert len(ids) == len(sentence.split())  # every ShapesWorld word is one token
    assert tokenizer.decode(ids) == sentence
    assert tokenizer.decode(tokenizer.encode("zébra 🦓", add_bos=False)) == "zébra 🦓"  # any text still encodes


def test_examples_are_a_function_of_seed_and_index():
    first, again = ShapesImages(3, 128), ShapesImages(3, 128)
    assert np.array_equal(np.asarray(first[5]), np.asarray(again[5]))
    assert not np.array_equal(np.asarray(first[5]), np.asarray(first[6]))
    held_out = ShapesImages(3, 128, split="validation")
    assert not np.array_equal(np.asarray(first[5]), np.asarray(held_out[5]))
    generation = ShapesGeneration(0, 128, {"geneval": 1.0})
    example = generation[11]
    assert example.prompt == generation[11].prompt
    prompt = next(p for p in (world.sample_prompt(np.random.default_rng(i), t) for i in range(50) for t in world.TASKS)
                  if p.text == example.prompt)
    assert world.score_image(example.image, prompt)  # the render satisfies its own prompt


def test_generation_prompts_can_be_restricted_to_one_geneval_task():
    singles = ShapesGeneration(0, 128, {"single_object": 1.0})
    texts = {singles[i].prompt for i in range(30)}
    assert texts == {f"a photo of {world.with_article(s)}" for s in world.SHAPES}
    assert all(len(world.detect_objects(singles[i].image)) == 1 for i in range(10))
    mixed = ShapesGeneration(0, 128, {"caption": 1.0, "counting": 1.0})
    prompts = [mixed[i].prompt for i in range(40)]
    counting = [p for p in prompts if p.startswith("a photo of ")]
    assert 5 < len(counting) < 35 and all(p.split()[3] in ("two", "three", "four") for p in counting)
    assert all(world.parse_caption(p) for p in prompts if p not in counting)  # the rest are dense captions


def test_understanding_questions_can_be_restricted_to_one_family():
    shapes_asked = ShapesUnderstanding(0, 128, {"shape_of": 1.0})
    answers = {shapes_asked[i].messages[1]["content"] for i in range(20)}
    assert answers <= set(world.SHAPES) and len(answers) > 1
    mixed = ShapesUnderstanding(0, 128, {"caption": 1.0, "count_shape": 1.0})
    questions = [mixed[i].messages[0]["content"] for i in range(40)]
    counted = [q for q in questions if q != DESCRIBE_QUESTION]
    assert 5 < len(counted) < 35 and all(q.startswith("How many") for q in counted)


def test_understanding_loss_is_on_the_answer_only_and_the_prompt_matches_inference(tokenizer):
    example = ShapesUnderstanding(0, 128, {"vqa": 1.0})[4]
    sample = encode_conversation(tokenizer, FMT, example, image_tokens=64)
    supervised = [t for t in sample.targets if t != IGNORE_INDEX]
    answer = example.messages[1]["content"]
    assert supervised == tokenizer.encode(" " + answer, add_bos=False) + [tokenizer.eos_id]
    # Targets are shifted: the token at position t + 1 is predicted at t.
    first = sample.targets.index(supervised[0])
    assert sample.ids[first + 1:first + 1 + len(supervised)] == supervised
    # Everything before the answer is exactly what the pipeline feeds when asking the question.
    question = [{"role": "user", "content": example.messages[0]["content"], "images": example.images}]
    prompt = understanding_batch([question], tokenizer, FMT, 128, 64).input_ids[0].tolist()
    assert sample.ids[:first + 1] == prompt
    assert sample.ids.count(tokenizer.image_id) == 64


def test_every_answer_of_a_multi_turn_chat_is_supervised(tokenizer):
    messages = [{"role": "user", "content": "How many objects are there?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "What color is the circle?"}, {"role": "assistant", "content": "red"}]
    sample = encode_conversation(tokenizer, FMT, ConversationExample(messages), image_tokens=64)
    supervised = [t for t in sample.targets if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised, skip_special_tokens=False).split(tokenizer.decode(
        [tokenizer.eos_id], skip_special_tokens=False)) == [" 2", " red", ""]
    assert sample.kind == "text"


def test_plain_text_is_supervised_after_bos(tokenizer):
    sample = encode_text(tokenizer, TextExample("a red circle in the center."))
    assert sample.ids[0] == tokenizer.bos_id and sample.ids[-1] == tokenizer.eos_id
    assert sample.targets == sample.ids[1:] + [IGNORE_INDEX]


def test_dropped_caption_is_exactly_the_guidance_row_of_inference(tokenizer):
    example = GenerationExample("a photo of a red circle left of a blue square", Image.new("RGB", (128, 128)))
    dropped = encode_generation(tokenizer, FMT, example, unconditional=True)
    batch = generation_batch([example.prompt], tokenizer, FMT)
    assert dropped.ids == unconditional_ids(batch.input_ids, batch.padding_mask, tokenizer.pad_id)[0].tolist()
    assert dropped.ids[0] == tokenizer.bos_id and dropped.ids[-1] == tokenizer.boi_id
    assert set(dropped.ids[1:-1]) == {tokenizer.pad_id}
    kept = encode_generation(tokenizer, FMT, example)
    assert kept.ids == batch.input_ids[0].tolist() and all(t == IGNORE_INDEX for t in kept.targets)


def test_caption_drop_rate_is_ten_percent(tokenizer):
    from openjanus.model import JanusModel
    from openjanus.train.config import recipe_from_dict
    from openjanus.train.distributed import DistributedContext
    from openjanus.train.janus import JanusTask

    recipe = recipe_from_dict({"name": "drop", "model": {"llm": {"num_layers": 1}, "vq": {"ch": 32}}, "stages": [
        {"name": "s", "task": "janus", "steps": 1, "batch_size": 1, "model": {"init": "scratch", "train": ["gen_head"]},
         "data": {"ratios": {"generation": 1}}}]})
    with torch.device("meta"):
        task = JanusTask(recipe.stages[0], JanusModel(recipe.janus_config()), tokenizer, DistributedContext())
    example = GenerationExample("a photo of a square", Image.new("RGB", (128, 128)))
    drops = [set(task.encode("generation", example, i).ids[1:-1]) == {tokenizer.pad_id} for i in range(3000)]
    assert abs(np.mean(drops) - 0.1) < 0.017  # 3 standard deviations
    assert drops[:100] == [set(task.encode("generation", example, i).ids[1:-1]) == {tokenizer.pad_id}
                           for i in range(100)]  # a pure function of the index


def test_mixture_keeps_ratios_in_every_batch_and_is_deterministic():
    mixture = Mixture({"understanding": 2, "text": 3, "generation": 5}, batch_size=32, seed=1)
    totals = Counter()
    for step in range(200):
        counts = Counter(mixture.kinds(step))
        assert sum(counts.values()) == 32
        for kind, share in (("understanding", 0.2), ("text", 0.3), ("generation", 0.5)):
            assert abs(counts[kind] - share * 32) < 1  # floor or ceil of the quota
        totals.update(counts)
    assert abs(totals["text"] / (200 * 32) - 0.3) < 0.005
    assert mixture.kinds(7) == Mixture({"understanding": 2, "text": 3, "generation": 5}, 32, 1).kinds(7)
    indices = [index for step in range(50) for kind, index in mixture.slots(step) if kind == "generation"]
    assert len(set(indices)) == len(indices)  # every example of a stream is read at most once


def test_collate_puts_image_codes_after_the_prompt(tokenizer):
    image = Image.new("RGB", (128, 128), (128, 128, 128))
    samples = [encode_generation(tokenizer, FMT, GenerationExample("a photo of a circle", image)),
               encode_conversation(tokenizer, FMT, ConversationExample(
                   [{"role": "user", "content": "How many objects are there?"},
                    {"role": "assistant", "content": "0"}], [image]), image_tokens=4)]
    batch = collate(samples, tokenizer.pad_id, tokenizer.image_id, image_size=32, num_image_tokens=16)
    prompt = len(samples[0].ids)
    assert batch.code_target_mask[0].nonzero().flatten().tolist() == list(range(prompt - 1, prompt + 15))
    assert batch.code_input_mask[0].nonzero().flatten().tolist() == list(range(prompt, prompt + 15))
    assert int(batch.image_mask[1].sum()) == 4 and not batch.image_mask[0].any()
    assert batch.generation_pixels.shape == (1, 3, 32, 32) and batch.pixel_values.shape == (1, 3, 32, 32)
    assert batch.num_targets == 16 + 2  # codes + answer and EOS


def test_jsonl_files_give_conversations_pairs_and_text(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    lines = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat color?"},
                                                  {"from": "gpt", "value": "red"}]},
             {"file_name": "a.png", "text": "a red rectangle"},
             {"text": "plain words"}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    data = JsonlDataset(path, seed=0)
    examples = [data[i] for i in range(3)]
    kinds = sorted(type(e).__name__ for e in examples)
    assert kinds == ["ConversationExample", "GenerationExample", "TextExample"]
    conversation = next(e for e in examples if isinstance(e, ConversationExample))
    assert conversation.messages[0]["content"].startswith("<image_placeholder>") and len(conversation.images) == 1
    assert len(data) == 3 and sorted(type(data[i]).__name__ for i in range(3, 6)) == kinds  # the next pass
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        JsonlDataset(tmp_path / "missing.jsonl")


def one_stage_recipe(stage: dict):
    """A recipe of one stage on a model small enough to build in a test (64 px images, 16 image tokens)."""
    from openjanus.train.config import recipe_from_dict

    return recipe_from_dict({"name": "tiny", "model": {
        "llm": {"num_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "num_kv_heads": 2},
        "vision": {"image_size": 64, "patch_size": 16, "width": 32, "layers": 1, "heads": 2},
        "vq": {"ch": 32, "codebook_size": 1024, "codebook_embed_dim": 8}}, "stages": [stage]})


def test_fp32_image_codes_encode_generation_targets_outside_bf16_autocast(tokenizer):
    from openjanus.config import ConfigError
    from openjanus.model import JanusModel
    from openjanus.train.distributed import DistributedContext
    from openjanus.train.janus import JanusObjective, JanusTask

    recipe = one_stage_recipe({"name": "s", "task": "janus", "steps": 1, "batch_size": 1,
                               "model": {"init": "scratch", "train": ["gen_head"]}, "loss": {"fp32_image_codes": True}})
    torch.manual_seed(0)
    model = JanusModel(recipe.janus_config()).eval()
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(4)]
    samples = [encode_generation(tokenizer, FMT, GenerationExample("a photo of a circle", image)) for image in images]
    batch = collate(samples, tokenizer.pad_id, tokenizer.image_id, image_size=64, num_image_tokens=16)
    with torch.no_grad():
        fp32_codes = model.gen_vision_model.encode(batch.generation_pixels)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, default_codes = JanusObjective(model, {}).input_embeddings(batch)
        _, option_codes = JanusObjective(model, {}, fp32_image_codes=True).input_embeddings(batch)
    assert torch.equal(option_codes, fp32_codes)
    assert not torch.equal(default_codes, fp32_codes)  # bf16 encoding does flip codes: the option matters

    # FSDP would gather the VQ in bf16: the stage is refused with a clear error, not run in bf16.
    task = JanusTask(recipe.stages[0], model, tokenizer, DistributedContext(world_size=2))
    with pytest.raises(ConfigError, match="fp32_image_codes.*use ddp"):
        task.on_device(torch.device("cpu"), "fsdp")
    task.on_device(torch.device("cpu"), "ddp")


@pytest.mark.parametrize("loss", [{"codebook_restart_every": 5}, {"quantize_start_step": 3}])
def test_vq_codebook_restarts_are_refused_under_fsdp(tokenizer, loss):
    from openjanus.config import ConfigError
    from openjanus.model import JanusModel
    from openjanus.train.distributed import DistributedContext
    from openjanus.train.vq import VQTask

    recipe = one_stage_recipe({"name": "vq", "task": "vq", "steps": 1, "batch_size": 1,
                               "model": {"init": "scratch", "train": ["gen_vision_model"]}, "loss": loss})
    task = VQTask(recipe.stages[0], JanusModel(recipe.janus_config()), tokenizer, DistributedContext(world_size=2))
    with pytest.raises(ConfigError, match="codebook restarts need whole codebooks: use ddp"):
        task.on_device(torch.device("cpu"), "fsdp")
    task.on_device(torch.device("cpu"), "ddp")
