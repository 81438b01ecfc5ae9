"""Evaluations: exact scoring with fake pipelines, one real tiny-checkpoint run end to end, GenEval export layout."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from openjanus.config import JanusConfig, LLMConfig, VisionConfig, VQConfig
from openjanus.eval import (
    export_geneval,
    load_metadata,
    prompt_from_metadata,
    score_shapes_export,
    shapes_geneval,
    shapes_geneval_metadata,
    shapes_metadata,
    shapes_vqa,
    write_metadata,
)
from openjanus.eval.cli import register
from openjanus.model import JanusModel
from openjanus.pipeline import JanusPipeline
from openjanus.processing.image import tensor_to_pil
from openjanus.weights import save_checkpoint
from openjanus.worlds import shapes

SIZE = 128


# ---------------------------------------------------------------------------
# Fakes: a pipeline whose "model" draws with a function of the prompt and answers with a function


class FakeVQ(torch.nn.Module):
    """Lossless VQ stand-in: an image 'encodes' to one token, the index of its stored copy."""

    def __init__(self, pipe: FakePipe):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the evaluation a device and dtype
        self.pipe = pipe

    def encode(self, pixels: torch.Tensor):
        return None, self.pipe.store(tensor_to_pil(pixels)), None, None


class FakePipe:
    """Just the pipeline surface the evaluations use; images are kept and addressed by one-token 'codes'."""

    def __init__(self, draw=None, reply=None, size: int = SIZE):
        self.config = SimpleNamespace(image_size=size, num_image_tokens=1)
        self.device = torch.device("cpu")
        self.model = SimpleNamespace(gen_vision_model=FakeVQ(self))
        self.draw, self.reply = draw, reply
        self.images: list[Image.Image] = []

    def store(self, images: list[Image.Image]) -> torch.Tensor:
        start = len(self.images)
        self.images += images
        return torch.arange(start, len(self.images))[:, None]

    def generate_image_tokens(self, prompts, num_images_per_prompt=1, seed=None, **kwargs) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        return self.store([self.draw(text, rng) for text in prompts for _ in range(num_images_per_prompt)])

    def decode_images(self, codes: torch.Tensor) -> list[Image.Image]:
        return [self.images[int(i)] for i in codes[:, 0]]

    def answer(self, conversations, **kwargs) -> list[str]:
        return [self.reply(c[0]["images"][0], c[0]["content"]) for c in conversations]


PROMPTS = {p.text: p for p in shapes.test_prompts(10)}


def truth(text: str, rng: np.random.Generator) -> Image.Image:
    return shapes.render(shapes.scene_for_prompt(rng, PROMPTS[text], SIZE))


def blank(text: str, rng: np.random.Generator) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), shapes.BACKGROUND)


# ---------------------------------------------------------------------------
# shapes-GenEval scoring


def test_ground_truth_images_score_one_and_blank_images_zero():
    right = shapes_geneval(FakePipe(truth), n_per_task=10, images_per_prompt=2, progress=False)
    assert set(right["scores"]) == {*shapes.TASKS, "overall"}
    assert all(score >= 0.99 for score in right["scores"].values())
    assert right["counts"]["counting"] == {"correct": right["counts"]["counting"]["correct"], "total": 20}
    for ceiling in ("oracle_ceiling", "tokenizer_ceiling"):  # the fake VQ is lossless
        assert all(score >= 0.99 for score in right[ceiling].values())

    empty = shapes_geneval(FakePipe(blank), n_per_task=10, images_per_prompt=2, progress=False)
    assert all(score == 0.0 for score in empty["scores"].values())
    assert empty["overall"] == 0.0 and empty["oracle_ceiling"]["overall"] >= 0.99


def test_drawn_tallies_what_is_drawn_for_each_named_word():
    right = shapes_geneval(FakePipe(truth), n_per_task=10, images_per_prompt=2, progress=False)
    assert set(right["drawn"]) == {"single_object", "colors"}
    for words in right["drawn"].values():  # ground truth draws every named word as itself
        assert all(set(seen) == {word} for word, seen in words.items())
    assert sum(sum(seen.values()) for seen in right["drawn"]["single_object"].values()) == 20

    def squares_only(text, rng):  # every prompt drawn as one red square
        scene = shapes.Scene(SIZE, (shapes.ShapeObject("square", "red", SIZE / 2, SIZE / 2, 0.13 * SIZE),))
        return shapes.render(scene)

    drawn = shapes_geneval(FakePipe(squares_only), n_per_task=10, images_per_prompt=2, progress=False)["drawn"]
    assert all(set(seen) == {"square"} for seen in drawn["single_object"].values())
    # colors: the colour of the named shape, so only prompts naming a square see red
    square_prompts = sum(p.task == "colors" and p.spec["shapes"][0] == "square" for p in shapes.test_prompts(10))
    assert 0 < square_prompts < 10
    assert sum(seen.get("red", 0) for seen in drawn["colors"].values()) == 2 * square_prompts
    assert sum(seen.get("none", 0) for seen in drawn["colors"].values()) == 2 * (10 - square_prompts)
    empty = shapes_geneval(FakePipe(blank), n_per_task=10, images_per_prompt=2, progress=False)["drawn"]
    assert all(set(seen) == {"none"} for words in empty.values() for seen in words.values())


def test_overall_is_the_mean_of_task_scores():
    def only_single(text, rng):
        return truth(text, rng) if PROMPTS[text].task == "single_object" else blank(text, rng)

    report = shapes_geneval(FakePipe(only_single), n_per_task=5, images_per_prompt=1, batch_size=4, progress=False)
    assert report["scores"]["single_object"] == 1.0
    assert all(report["scores"][task] == 0.0 for task in shapes.TASKS[1:])
    assert report["overall"] == pytest.approx(1 / 6)
    assert [row["correct"] for row in report["per_prompt"][:5]] == [[True]] * 5


def test_generation_is_seeded_per_batch():
    seeds = []

    class Recorder(FakePipe):
        def generate_image_tokens(self, prompts, num_images_per_prompt=1, seed=None, **kwargs):
            seeds.append(seed)
            return super().generate_image_tokens(prompts, num_images_per_prompt, seed)

    for seed in (0, 0, 1):
        shapes_geneval(Recorder(truth), n_per_task=2, images_per_prompt=1, batch_size=5, seed=seed, progress=False)
    first, again, other = seeds[:3], seeds[3:6], seeds[6:]
    assert first == again and len(set(first)) == 3 and not set(first) & set(other)


@pytest.mark.parametrize("size", [96, 120, 200])
def test_models_with_sizes_shapesworld_cannot_draw_are_refused(size):
    with pytest.raises(ValueError, match="multiple of 16"):
        shapes_geneval(FakePipe(truth, size=size), n_per_task=1, progress=False)
    with pytest.raises(ValueError, match="multiple of 16"):
        shapes_vqa(FakePipe(reply=lambda image, question: "yes", size=size), n_per_family=1, progress=False)


# ---------------------------------------------------------------------------
# shapes-VQA scoring


def test_vqa_right_answers_score_one_and_constant_yes_matches_the_data():
    pairs = shapes.test_questions(8, size=SIZE)
    expected = {(shapes.render(scene).tobytes(), q.text): q.answer for scene, q in pairs}

    right = shapes_vqa(FakePipe(reply=lambda image, text: expected[image.tobytes(), text] + "."),
                       n_per_family=8, batch_size=5, progress=False)
    assert right["scores"] == {**{family: 1.0 for family in shapes.QUESTION_FAMILIES}, "overall": 1.0}

    yes = shapes_vqa(FakePipe(reply=lambda image, text: "Yes, there is."), n_per_family=8, progress=False)
    assert yes["yes_ratio"] == {"exists": 1.0, "relation": 1.0, "overall": 1.0}
    for family in ("exists", "relation"):
        share = np.mean([q.answer == "yes" for _, q in pairs if q.family == family])
        assert yes["scores"][family] == pytest.approx(share) == pytest.approx(yes["expected_yes_ratio"][family])
    assert all(yes["scores"][f] == 0.0 for f in ("count_all", "count_shape", "color_of", "shape_of"))
    assert yes["overall"] == pytest.approx(np.mean([yes["scores"][f] for f in shapes.QUESTION_FAMILIES]))


def test_vqa_answered_tallies_each_expected_answer():
    pairs = shapes.test_questions(8, size=SIZE)
    expected = {(shapes.render(scene).tobytes(), q.text): q.answer for scene, q in pairs}
    right = shapes_vqa(FakePipe(reply=lambda image, text: expected[image.tobytes(), text].upper() + "!"),
                       n_per_family=8, progress=False)["answered"]
    assert set(right) == {"count_all", "count_shape", "color_of", "shape_of"}  # not the yes/no families
    for rows in right.values():
        assert all(set(seen) == {answer} for answer, seen in rows.items())
        assert sum(sum(seen.values()) for seen in rows.values()) == 8

    circle = shapes_vqa(FakePipe(reply=lambda image, text: "circle"), n_per_family=8, progress=False)["answered"]
    truth = Counter(q.answer for _, q in pairs if q.family == "shape_of")
    assert circle["shape_of"] == {answer: {"circle": n} for answer, n in truth.items()}
    empty = shapes_vqa(FakePipe(reply=lambda image, text: " "), n_per_family=2, progress=False)["answered"]
    assert all(set(seen) == {""} for seen in empty["color_of"].values())


# ---------------------------------------------------------------------------
# GenEval export


def test_shapes_prompts_map_onto_geneval_metadata_and_back():
    for prompt in shapes.test_prompts(10):
        metadata = shapes_metadata(prompt)
        assert list(metadata)[0] == "tag" and list(metadata)[-1] == "prompt"
        assert prompt_from_metadata(json.loads(json.dumps(metadata))) == prompt
    counting = next(p for p in shapes.test_prompts(3) if p.task == "counting")
    n = counting.spec["count"]
    assert shapes_metadata(counting)["exclude"] == [{"class": counting.spec["shapes"][0], "count": n + 1}]
    position = next(p for p in shapes.test_prompts(3) if p.task == "position")
    a, b = position.spec["shapes"]
    assert shapes_metadata(position)["include"] == [
        {"class": b, "count": 1}, {"class": a, "count": 1, "position": [position.spec["relation"], 0]}]
    with pytest.raises(ValueError, match="not a ShapesWorld"):
        prompt_from_metadata({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"})


def test_export_writes_the_official_geneval_layout(tmp_path):
    metadata_file = write_metadata(tmp_path / "evaluation_metadata.jsonl", shapes_geneval_metadata(2))
    metadata = load_metadata(metadata_file)
    assert len(metadata) == 12

    out = tmp_path / "images"
    summary = export_geneval(FakePipe(truth), metadata_file, out, images_per_prompt=3, batch_size=5, progress=False)
    assert summary["prompts"] == 12 and summary["images"] == 36
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}" for i in range(12)]
    for index, entry in enumerate(metadata):
        folder = out / f"{index:05d}"
        assert sorted(p.name for p in folder.iterdir()) == ["metadata.jsonl", "samples"]
        with open(folder / "metadata.jsonl") as fp:
            assert json.load(fp) == entry  # exactly how evaluate_images.py reads it
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    report = score_shapes_export(out)
    assert report["scores"]["overall"] == 1.0 and report["counts"]["position"]["total"] == 6

    with pytest.raises(ValueError, match="not an empty folder"):
        export_geneval(FakePipe(truth), metadata_file, out, progress=False)
    with pytest.raises(ValueError, match="lacks tag"):
        export_geneval(FakePipe(truth), [{"prompt": "a photo of a circle"}], tmp_path / "new", progress=False)


# ---------------------------------------------------------------------------
# A real tiny checkpoint through the real pipeline


def tiny_shapes_config() -> JanusConfig:
    """128 px images: 4x4 understanding patches of 32 px, an 8x8 VQ grid (4 downsamplings), tiny widths."""
    return JanusConfig(
        llm=LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=512, context_length=512),
        vision=VisionConfig(image_size=SIZE, patch_size=32, width=32, layers=1, heads=4, global_pool=""),
        vq=VQConfig(codebook_size=64, codebook_embed_dim=4, ch=32, encoder_ch_mult=[1, 1, 1, 1, 1],
                    decoder_ch_mult=[1, 1, 1, 1, 1], z_channels=32, num_res_blocks=1, codebook_show_usage=False),
    ).validate()


@pytest.fixture(scope="module")
def shapes_model_dir(tmp_path_factory, tokenizer_file) -> Path:
    torch.manual_seed(0)
    model = JanusModel(tiny_shapes_config())
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny-shapes"), tokenizer_file=tokenizer_file)


@pytest.fixture(scope="module")
def pipe(shapes_model_dir) -> JanusPipeline:
    return JanusPipeline.from_pretrained(shapes_model_dir, device="cpu")


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_real_pipeline_geneval_report_files_and_determinism(pipe, tmp_path):
    kwargs = dict(n_per_task=1, images_per_prompt=2, batch_size=4, progress=False)
    first = shapes_geneval(pipe, seed=3, out_dir=tmp_path / "a", **kwargs)
    assert {"scores", "counts", "overall", "oracle_ceiling", "tokenizer_ceiling", "settings", "timing",
            "per_prompt", "files"} <= set(first)
    assert set(first["scores"]) == set(first["tokenizer_ceiling"]) == {*shapes.TASKS, "overall"}
    assert first["oracle_ceiling"]["overall"] >= 0.99
    assert 0.0 <= first["tokenizer_ceiling"]["overall"] <= 1.0
    assert first["settings"]["image_size"] == SIZE and first["settings"]["image_tokens"] == 64
    assert first["settings"]["images"] == 12 and first["timing"]["total_s"] > 0
    assert first["timing"]["forward_passes_per_batch"] == 64  # plain decoding: one pass per image token
    saved = json.loads((tmp_path / "a" / "shapes_geneval.json").read_text())
    assert saved["scores"] == first["scores"] and saved["per_prompt"] == first["per_prompt"]
    grid = _pixels(tmp_path / "a" / "shapes_geneval_samples.png")
    assert grid.shape[0] > 6 * SIZE and grid.shape[1] > 2 * SIZE

    again = shapes_geneval(pipe, seed=3, out_dir=tmp_path / "b", **kwargs)
    assert again["per_prompt"] == first["per_prompt"]
    assert np.array_equal(_pixels(tmp_path / "b" / "shapes_geneval_samples.png"), grid)
    shapes_geneval(pipe, seed=4, out_dir=tmp_path / "c", **kwargs)
    assert not np.array_equal(_pixels(tmp_path / "c" / "shapes_geneval_samples.png"), grid)


def test_real_pipeline_vqa_report_and_files(pipe, tmp_path):
    report = shapes_vqa(pipe, n_per_family=2, batch_size=5, max_new_tokens=3, out_dir=tmp_path, progress=False)
    assert set(report["scores"]) == {*shapes.QUESTION_FAMILIES, "overall"}
    assert len(report["per_question"]) == 12 and report["settings"]["image_size"] == SIZE
    assert set(report["yes_ratio"]) == {"exists", "relation", "overall"}
    assert (tmp_path / "shapes_vqa.json").is_file() and (tmp_path / "shapes_vqa_samples.png").is_file()
    again = shapes_vqa(pipe, n_per_family=2, batch_size=3, max_new_tokens=3, progress=False)
    assert [q["answer"] for q in again["per_question"]] == [q["answer"] for q in report["per_question"]]


def test_cli_runs_the_evaluations_and_reports_errors_in_one_line(shapes_model_dir, tiny_model_dir, tmp_path,
                                                                monkeypatch):
    app = typer.Typer()
    app.command()(lambda: None)  # a second command, so that `eval` stays a subcommand
    register(app)
    runner = CliRunner()

    result = runner.invoke(app, ["eval", "shapes-geneval", "--model", str(shapes_model_dir), "--n-per-task", "1",
                                 "--images-per-prompt", "1", "--out", str(tmp_path / "gen"), "--jacobi-window", "8"])
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and "tokenizer" in result.output
    assert "forward passes per batch" in result.output
    assert (tmp_path / "gen" / "shapes_geneval.json").is_file()

    result = runner.invoke(app, ["eval", "shapes-vqa", "--model", str(shapes_model_dir), "--n-per-family", "1",
                                 "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "count_all" in result.output

    prompts = tmp_path / "shapes.jsonl"
    result = runner.invoke(app, ["eval", "shapes-metadata", "--out", str(prompts), "--n-per-task", "1"])
    assert result.exit_code == 0 and len(prompts.read_text().splitlines()) == 6
    result = runner.invoke(app, ["eval", "geneval-export", "--model", str(shapes_model_dir), "--prompts",
                                 str(prompts), "--out", str(tmp_path / "export"), "--images-per-prompt", "1"])
    assert result.exit_code == 0, result.output
    assert _pixels(tmp_path / "export" / "00005" / "samples" / "0000.png").shape == (SIZE, SIZE, 3)

    monkeypatch.setattr("openjanus.pipeline.DEFAULT_MODEL_DIR", tmp_path / "no-model")
    failures = [
        (["eval", "shapes-geneval"], "no default model"),
        (["eval", "shapes-vqa", "--model", str(tiny_model_dir)], "32px images"),
        (["eval", "geneval-export", "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")],
         "not found"),
    ]
    for args, message in failures:
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
