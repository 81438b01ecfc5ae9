"""The training loop and the recipe runner on one process: every stage, freezing, exact resume, refusals, CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import typer
import yaml
from conftest import run_until_interrupted
from safetensors.torch import load_file
from typer.testing import CliRunner

from openjanus import JanusPipeline
from openjanus.config import ConfigError
from openjanus.model import JanusModel
from openjanus.processing.tokenizer import JanusTokenizer
from openjanus.train import checkpoint as checkpoint_module
from openjanus.train import load_recipe, recipe_from_dict, run
from openjanus.train.checkpoint import ResumeError, load_state
from openjanus.train.cli import register
from openjanus.train.config import OptimConfig
from openjanus.train.distributed import DistributedContext
from openjanus.train.loop import StageTrainer, lr_factor
from openjanus.train.runner import TASK_CLASSES
from openjanus.train.tasks import initialize_weights

TINY = Path(__file__).parent.parent / "configs" / "test-tiny.yaml"
STAGES = ["vq", "encoder", "text", "stage1", "stage2", "stage3"]


def tiny_recipe() -> dict:
    return yaml.safe_load(TINY.read_text())


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / stage / "output" / "model.safetensors")


def component(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(name + ".")}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory) -> Path:
    """The whole test-tiny recipe, once."""
    run_dir = tmp_path_factory.mktemp("run")
    run(TINY, run_dir=run_dir, echo=lambda _: None)
    return run_dir


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_stage_writes_a_model_the_pipeline_loads(recipe_run):
    for stage in STAGES:
        summary = json.loads((recipe_run / stage / "output" / "training.json").read_text())
        assert summary["step"] == 3 and summary["metrics"]["loss"] > 0
        assert (recipe_run / stage / "metrics.jsonl").exists()
    pipe = JanusPipeline.from_pretrained(recipe_run / "stage3" / "output", device="cpu")
    images = pipe.generate_images(["a photo of a red circle"], num_images_per_prompt=2, seed=0, progress=False)
    assert [image.size for image in images] == [(32, 32), (32, 32)]
    assert isinstance(pipe.ask(images[0], "What color is the circle?", max_new_tokens=4), str)
    vq = json.loads((recipe_run / "vq" / "output" / "training.json").read_text())["metrics"]
    assert {"eval_psnr", "eval_checker_reconstruction", "eval_checker_oracle", "eval_codebook_usage"} <= set(vq)


def test_vq_warm_up_and_unused_codes_restarts(recipe_run):
    lines = [json.loads(line) for line in (recipe_run / "vq" / "metrics.jsonl").read_text().splitlines()]
    # Step 1 is the autoencoder warm-up (no commitment), after which every one of the 64 codes is re-seeded.
    assert lines[0]["loss_commitment"] == 0 and lines[0]["codes_restarted"] == 64
    assert lines[1]["loss_commitment"] > 0 and 0 < lines[1]["codes_restarted"] < 64  # unused codes, every 2 steps
    assert "codes_restarted" not in lines[2]
    counts = load_state(recipe_run / "vq" / "checkpoint.pt")["task"]["code_counts"]
    assert int(counts.sum()) == 4 * 4  # step 3 since the restart: 4 crops of 2x2 codes


def test_each_stage_trains_only_its_components(recipe_run):
    outputs = {stage: weights(recipe_run, stage) for stage in STAGES}
    vq = component(outputs["vq"], "gen_vision_model")
    for stage in STAGES[1:]:
        assert same(component(outputs[stage], "gen_vision_model"), vq), stage  # the VQ model is always frozen
    for name in ("language_model", "vision_model"):  # stage I: LLM and understanding encoder frozen
        assert same(component(outputs["stage1"], name), component(outputs["text"], name)), name
    for name in ("aligner", "gen_aligner", "gen_embed", "gen_head"):
        assert not same(component(outputs["stage1"], name), component(outputs["text"], name)), name
    assert not same(component(outputs["stage2"], "language_model"), component(outputs["stage1"], "language_model"))
    assert same(component(outputs["stage2"], "vision_model"), component(outputs["stage1"], "vision_model"))
    assert not same(component(outputs["stage3"], "vision_model"), component(outputs["stage2"], "vision_model"))
    assert not same(component(outputs["encoder"], "vision_model"), component(outputs["vq"], "vision_model"))
    assert same(component(outputs["encoder"], "language_model"), component(outputs["vq"], "language_model"))


def test_a_finished_recipe_is_skipped_and_a_changed_one_refused(recipe_run, tmp_path):
    messages = []
    run(TINY, run_dir=recipe_run, echo=messages.append)
    assert len(messages) == len(STAGES) and all("skipping" in m for m in messages)
    changed = tiny_recipe()
    changed["stages"][4]["optim"]["lr"] = 0.123
    with pytest.raises(ResumeError, match=r"optim\.lr"):
        run(write_recipe(tmp_path / "changed.yaml", changed), run_dir=recipe_run, stage="stage2")
    checkpoint = recipe_run / "stage2" / "checkpoint.pt"
    (recipe_run / "stage2" / "output" / "training.json").unlink()  # as if interrupted before the end
    with pytest.raises(ResumeError, match=r"different config \(changed: optim\.lr\)"):
        run(write_recipe(tmp_path / "changed.yaml", changed), run_dir=recipe_run, stage="stage2")
    assert load_state(checkpoint)["step"] == 3


def resume_recipe(run_dir: Path, stage_name: str = "stage2") -> dict:
    """One stage of 6 steps, checkpointed every 2: the VQ one (codebook restarts every 2 steps) from scratch,
    or the Janus stage II from the recipe's stage-I model (accumulating 2 micro-batches)."""
    recipe = tiny_recipe()
    stage = copy.deepcopy(next(s for s in recipe["stages"] if s["name"] == stage_name))
    stage.update(steps=6, micro_batch_size=4)
    if stage_name == "stage2":
        stage["model"]["init"] = str(run_dir / "stage1" / "output")
    stage["data"].update(eval_batches=0, eval_images=0)
    return {"name": "resume", "model": recipe["model"], "tokenizer": {"file": str(run_dir / "tokenizer.json")},
            "runtime": recipe["runtime"], "stages": [stage]}


def losses(run_dir: Path, stage_name: str = "stage2") -> list[dict]:
    return [json.loads(line) for line in (run_dir / stage_name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage_name", ["stage2", "vq"])
def test_an_interrupted_run_resumes_exactly(recipe_run, tmp_path, monkeypatch, stage_name):
    config = write_recipe(tmp_path / "resume.yaml", resume_recipe(recipe_run, stage_name))
    run(config, run_dir=tmp_path / "straight", echo=lambda _: None)

    run_until_interrupted(config, tmp_path / "resumed", 5, monkeypatch)
    assert load_state(tmp_path / "resumed" / stage_name / "checkpoint.pt")["step"] == 4
    run(config, run_dir=tmp_path / "resumed", echo=lambda _: None)

    straight, resumed = losses(tmp_path / "straight", stage_name), losses(tmp_path / "resumed", stage_name)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed, strict=True):
        assert {k: v for k, v in a.items() if not k.endswith("_per_s")} == {k: v for k, v in b.items()
                                                                            if not k.endswith("_per_s")}
    assert same(weights(tmp_path / "straight", stage_name), weights(tmp_path / "resumed", stage_name))


def test_ctrl_c_while_saving_keeps_the_last_checkpoint(recipe_run, tmp_path, monkeypatch):
    config = write_recipe(tmp_path / "resume.yaml", resume_recipe(recipe_run))
    real_save, calls = torch.save, []

    def save_interrupted_the_second_time(state, handle):
        calls.append(1)
        if len(calls) == 2:
            handle.write(b"partial")
            raise KeyboardInterrupt
        real_save(state, handle)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_interrupted_the_second_time)
    with pytest.raises(KeyboardInterrupt):
        run(config, run_dir=tmp_path, echo=lambda _: None)
    assert load_state(tmp_path / "stage2" / "checkpoint.pt")["step"] == 2


@pytest.mark.parametrize(("stage_index", "precision"), [(0, "fp32"), (1, "fp32"), (4, "fp32"), (4, "bf16")],
                         ids=["vq", "encoder", "janus", "janus-bf16"])
def test_loss_decreases_on_a_fixed_batch(recipe_run, tmp_path, one_thread, stage_index, precision):
    recipe = load_recipe(TINY)
    recipe.runtime.precision = precision
    stage = recipe.stages[stage_index]
    stage.steps, stage.data.eval_batches, stage.optim.lr = 25, 0, 3e-3
    torch.manual_seed(0)
    model = JanusModel(recipe.janus_config())
    initialize_weights(model)
    task = TASK_CLASSES[stage.task](stage, model, JanusTokenizer.from_file(recipe_run / "tokenizer.json"),
                                    DistributedContext())
    fixed = task.batch(0, list(range(stage.batch_size)))
    task.batch = lambda step, slots, split="train": fixed
    StageTrainer(task, stage, recipe.stage_runtime(stage), DistributedContext(), tmp_path, "test").run(resume=False)
    curve = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert curve[-1] < 0.6 * curve[0], curve


def test_adversarial_vq_training_updates_a_discriminator(recipe_run, tmp_path):
    recipe = tiny_recipe()
    stage = recipe["stages"][0]
    stage["loss"] = {"adversarial": {"enabled": True, "start_step": 1, "channels": 8, "layers": 2}}  # 16 px crops
    stage["data"].update(eval_images=0, eval_batches=0)
    recipe.update(stages=[stage], tokenizer={"file": str(recipe_run / "tokenizer.json")})
    run(write_recipe(tmp_path / "gan.yaml", recipe), run_dir=tmp_path, echo=lambda _: None)
    lines = [json.loads(line) for line in (tmp_path / "vq" / "metrics.jsonl").read_text().splitlines()]
    assert "loss_generator" not in lines[0] and all("loss_generator" in m and "loss_discriminator" in m
                                                    for m in lines[1:])
    discriminator = load_state(tmp_path / "vq" / "checkpoint.pt")["task"]["discriminator"]
    assert any(name.endswith("running_mean") for name in discriminator)  # BatchNorm, as LlamaGen's


def test_janus_stage_reads_json_lines_files(recipe_run, tmp_path):
    from PIL import Image

    for index, color in enumerate(("red", "blue")):
        Image.new("RGB", (48, 40), color).save(tmp_path / f"{index}.png")
    pairs = [{"file_name": f"{i}.png", "text": f"a {c} picture"} for i, c in enumerate(("red", "blue"))]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    recipe = tiny_recipe()
    stage = recipe["stages"][4]
    stage.update(steps=2, batch_size=4)
    stage["model"]["init"] = str(recipe_run / "stage1" / "output")
    stage["data"] = {"ratios": {"generation": 1}, "files": {"generation": str(tmp_path / "pairs.jsonl")},
                     "eval_batches": 0}
    recipe.update(stages=[stage], tokenizer={"file": str(recipe_run / "tokenizer.json")})
    run(write_recipe(tmp_path / "files.yaml", recipe), run_dir=tmp_path / "run", echo=lambda _: None)
    lines = [json.loads(line) for line in (tmp_path / "run" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(m["loss_generation"] > 0 for m in lines)


def test_gen_embed_can_start_from_the_vq_codebook(tmp_path):
    recipe = load_recipe(TINY)
    model = JanusModel(recipe.janus_config())
    task = TASK_CLASSES["janus"](recipe.stages[3], model, None, DistributedContext())
    task.on_start()
    assert torch.equal(model.gen_embed.weight, model.gen_vision_model.quantize.codebook())


def test_learning_rate_schedules():
    warm_constant = OptimConfig(warmup_steps=4)
    assert [lr_factor(s, warm_constant, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = OptimConfig(schedule="cosine", warmup_steps=0, min_lr_ratio=0.1)
    assert lr_factor(0, cosine, 10) == pytest.approx(1.0) and lr_factor(10, cosine, 10) == pytest.approx(0.1)
    assert lr_factor(5, cosine, 10) == pytest.approx(0.55)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["stages"][2]["optim"].update(lrr=1), r"unknown config key 'stages\[2\]\.optim\.lrr'"),
    (lambda r: r["stages"][1].update(steps="many"), r"'stages\[1\]\.steps' must be int"),
    (lambda r: r["stages"][4]["data"]["ratios"].update(video=1), r"stages\[4\] \(stage2\)\.data\.ratios\.video"),
    (lambda r: r["stages"][3]["model"]["train"].append("gen_vision_model"), "cannot be trained by a janus stage"),
    (lambda r: r["model"]["llm"].update(hidden_size="wide"), r"llm\.hidden_size"),
    (lambda r: r["stages"][0].pop("batch_size"), r"'stages\[0\]\.batch_size' is required"),
])
def test_invalid_configs_name_the_key(edit, message):
    recipe = tiny_recipe()
    edit(recipe)
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(recipe)


def test_missing_files_are_named_before_training(tmp_path):
    recipe = tiny_recipe()
    recipe["stages"][4]["data"]["files"] = {"generation": str(tmp_path / "pairs.jsonl")}
    with pytest.raises(ConfigError, match="data file not found: .*pairs.jsonl"):
        run(write_recipe(tmp_path / "r.yaml", recipe), run_dir=tmp_path / "run")
    recipe = tiny_recipe()
    recipe["tokenizer"] = {"file": str(tmp_path / "nope.json")}
    with pytest.raises(ConfigError, match="tokenizer file not found"):
        run(write_recipe(tmp_path / "r.yaml", recipe), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_dry_run_and_one_line_errors(tmp_path):
    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:  # a second command, so that typer keeps `train` as a subcommand
        """Nothing."""

    runner = CliRunner()
    result = runner.invoke(app, ["train", str(TINY), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "language_model" in result.output and "memory per device" in result.output
    assert "[6] stage3 (janus)" in result.output
    bad = tiny_recipe()
    bad["stages"][0]["optim"]["lr"] = "fast"
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "bad.yaml", bad))])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'bad.yaml'}: config key 'stages[0].optim.lr' must be float, got 'fast'"]
