"""The fine-tuning demonstration (examples/teach_a_new_shape.py) at small scale: the world's extended vocabulary,
the dataset in the user formats, a LoRA run on a tiny model, its merged output exported to transformers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from openjanus import JanusPipeline
from openjanus.cli import app
from openjanus.data import JsonlDataset, scan_data_file
from openjanus.processing.inputs import understanding_batch
from openjanus.train import run
from openjanus.worlds import shapes as world
from openjanus.worlds.shapes import GenPrompt, Scene, ShapeObject

EXAMPLE = Path(__file__).parent.parent / "examples" / "teach_a_new_shape.py"
TEAL = {"teal": (0, 150, 150)}


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("teach_a_new_shape", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# The world's vocabulary beyond the spec ------------------------------------------------------------------


@pytest.mark.parametrize("task", world.TASKS)
def test_the_extended_checker_scores_clean_renders_of_new_words_at_one(task):
    vocab = world.extend_vocabulary(TEAL, ["rectangle"])
    rng = np.random.default_rng(5)
    pairs = []
    while len(pairs) < 40:
        prompt = world.sample_prompt(rng, task, vocab)
        named = set(prompt.spec["shapes"]) | set(prompt.spec.get("colors", ()))
        if named & {"teal", "rectangle"}:
            scene = world.scene_for_prompt(rng, prompt, 128, vocab)
            pairs += [(world.render(scene), prompt), (world.render(scene, 256), prompt)]
    assert world.score_images(pairs, vocab)["overall"] == 1.0
    assert world.score_images(pairs)["overall"] == 0.0  # the spec's checker knows neither word


def test_rectangles_and_extra_colours_render_exactly():
    # Circumradius 64 at the centre: half-sides 3 * 64 / sqrt(10) = 60.7 and 64 / sqrt(10) = 20.2.
    rectangle = ShapeObject("rectangle", "teal", 128.0, 128.0, 64.0, rgb=TEAL["teal"])
    pixels = np.asarray(world.render(Scene(256, (rectangle,))))
    inside = np.all(pixels == TEAL["teal"], axis=2)
    assert {tuple(c) for c in pixels.reshape(-1, 3)} == {world.BACKGROUND, TEAL["teal"]}
    assert inside.sum() == 122 * 40 and inside[108:148, 67:189].all()  # pixel centres 67.5..188.5, 108.5..147.5
    half = 64 / np.sqrt(10)
    assert world.bbox(rectangle) == pytest.approx((128 - 3 * half, 128 - half, 128 + 3 * half, 128 + half))
    assert ShapeObject("circle", "red", 1, 2, 3, rgb=(220, 40, 40)) == ShapeObject("circle", "red", 1, 2, 3)
    with pytest.raises(ValueError, match="unknown color 'teal'"):
        ShapeObject("circle", "teal", 64, 64, 16)  # an extra colour needs its RGB
    with pytest.raises(ValueError, match="in the spec's palette"):
        ShapeObject("circle", "red", 64, 64, 16, rgb=(1, 2, 3))


@pytest.mark.parametrize(("colors", "shapes", "message"), [
    ({"gray": (120, 130, 125)}, (), "too close to the background"),
    ({"scarlet": (230, 40, 50)}, (), "too close to 'red'"),
    ({"red": (0, 0, 0)}, (), "already taken"),
    ({"circle": (0, 0, 0)}, (), "already taken"),
    ({"Teal": (0, 150, 150)}, (), "one lower-case word"),
    ({"teal": (0, 150)}, (), "three integers"),
    ({}, ("star",), "cannot add shape 'star'"),
])
def test_bad_extensions_are_refused(colors, shapes, message):
    with pytest.raises(ValueError, match=message):
        world.extend_vocabulary(colors, shapes)


def test_the_default_vocabulary_changes_nothing():
    spec = world.SPEC_VOCABULARY
    assert spec.colors == world.COLORS and spec.shapes == world.SHAPES
    for seed in range(20):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        scene = world.sample_scene(a)
        assert scene == world.sample_scene(b, vocab=spec)
        for task in world.TASKS:
            prompt = world.sample_prompt(a, task)
            assert prompt == world.sample_prompt(b, task, spec)
            assert world.scene_for_prompt(a, prompt) == world.scene_for_prompt(b, prompt, vocab=spec)
        assert world.questions_for_scene(a, scene) == world.questions_for_scene(b, scene, spec)
        image = world.render(scene)
        assert world.detect_objects(image) == world.detect_objects(image, spec)
        assert all(o.rgb is None for o in scene.objects)
    teal_circle = Scene(128, (ShapeObject("circle", "teal", 64, 64, 16, rgb=TEAL["teal"]),))
    prompt = GenPrompt("colors", "a photo of a teal circle", {"shapes": ("circle",), "colors": ("teal",)})
    assert not world.score_image(world.render(teal_circle), prompt)  # the spec's checker has no teal
    assert world.score_image(world.render(teal_circle), prompt, world.extend_vocabulary(TEAL))


# The demonstration's pieces -------------------------------------------------------------------------------


def test_the_demo_dataset_is_in_the_user_formats(tmp_path, demo):
    files = demo.write_dataset(tmp_path / "data", examples=24)
    assert files["understanding"].name == "llava.json" and files["generation"].name == "metadata.jsonl"
    records = json.loads(files["understanding"].read_text())
    assert len(records) == 24 and records[0]["conversations"][0]["value"].startswith("<image>\n")
    understanding = scan_data_file(files["understanding"], "understanding")
    generation = scan_data_file(files["generation"], "generation")
    assert len(understanding) == len(generation) == 24 and not understanding.bad and not generation.bad
    about_new = [demo.mentions_new_shape(r["conversations"][0]["value"], r["conversations"][1]["value"])
                 for r in records]
    prompts = [json.loads(line)["text"] for line in files["generation"].read_text().splitlines()]
    assert 0 < sum(about_new) < 24 and 0 < sum("rectangle" in p for p in prompts) < 24  # new and rehearsal
    example = JsonlDataset(files["generation"], kind="generation")[0]
    assert example.image.size == (128, 128) and example.prompt in prompts
    # The same arguments write the same files.
    again = demo.write_dataset(tmp_path / "again", examples=24)
    assert again["understanding"].read_bytes() == files["understanding"].read_bytes()
    assert Image.open(again["generation"].parent / "00003.png").tobytes() == \
        Image.open(files["generation"].parent / "00003.png").tobytes()


def test_the_held_out_items_name_the_new_shape_and_are_fixed(demo):
    pairs = demo.new_shape_questions(3)
    assert [q.family for _, q in pairs] == [f for f in demo.NEW_FAMILIES for _ in range(3)]
    assert all(demo.mentions_new_shape(q.text, q.answer) for _, q in pairs)
    assert all(any(o.shape == "rectangle" for o in scene.objects) for scene, _ in pairs)
    prompts = demo.new_shape_prompts(2)
    assert [p.task for p in prompts] == [t for t in world.TASKS for _ in range(2)]
    assert all("rectangle" in p.spec["shapes"] for p in prompts) and prompts == demo.new_shape_prompts(2)


def test_a_lora_run_on_the_demo_data_merges_and_exports_to_transformers(tmp_path, demo, tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    files = demo.write_dataset(tmp_path / "data", examples=12)
    recipe = demo.write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, files, steps=3, batch_size=4, rank=4,
                               runtime={"threads": 1, "log_every": 1})
    output = run(recipe, run_dir=tmp_path / "run", echo=lambda _: None)
    assert output == tmp_path / "run" / demo.STAGE / "output"
    metrics = [json.loads(line) for line in (output.parent / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["loss_understanding"] > 0 and m["loss_generation"] > 0 for m in metrics)

    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(output / "model.safetensors")
    assert after.keys() == before.keys()  # a plain checkpoint: the adapters are merged in
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(key.startswith("language_model.") for key in changed)

    # The merged output answers and draws through the demo's own measurements.
    pipe = JanusPipeline.from_pretrained(output, device="cpu", dtype="float32")
    understanding = demo.evaluate_new_understanding(pipe, 1)
    generation = demo.evaluate_new_generation(pipe, 1, batch_size=6)
    assert understanding["questions"] == len(demo.NEW_FAMILIES) and generation["images"] == len(world.TASKS)
    assert 0 <= understanding["overall"] <= 1 and generation["oracle_ceiling"] == 1.0

    # `openjanus convert --to hf`, then transformers gives the same logits as openjanus on a demo question.
    hf_dir = tmp_path / "hf"
    result = CliRunner().invoke(app, ["convert", str(output), str(hf_dir), "--to", "hf"])
    assert result.exit_code == 0, result.output
    hf = transformers.JanusForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    record = json.loads(files["understanding"].read_text())[0]
    image = Image.open(files["understanding"].parent / record["image"])
    question = record["conversations"][0]["value"].removeprefix("<image>\n")
    conversation = [{"role": "user", "content": question, "images": [image]}]
    batch = understanding_batch([conversation], pipe.tokenizer, pipe.chat_format, pipe.config.image_size,
                                pipe.config.vision.num_patches)
    model = pipe.model
    with torch.no_grad():
        reference = hf(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits
        ours = model.text_logits(model.hidden_states(model.prepare_inputs_embeds(
            batch.input_ids, batch.pixel_values, batch.image_mask)))
        text_ids = torch.tensor([pipe.tokenizer.encode("a photo of two rectangles")])
        text_reference = hf(input_ids=text_ids).logits
        text_ours = model.text_logits(model.hidden_states(model.embed_text(text_ids)))
    assert reference.dtype == ours.dtype == torch.float32
    assert (reference - ours).abs().max().item() <= 1e-4
    assert (text_reference - text_ours).abs().max().item() <= 1e-4
