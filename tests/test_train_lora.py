"""LoRA on the LLM through peft: adapters and the listed components train, the output is a plain checkpoint
with the adapters merged in, an interrupted run resumes exactly, --dry-run shows the adapters, bad sections
name their key."""

from __future__ import annotations

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
from openjanus.train import recipe_from_dict, run
from openjanus.train.checkpoint import load_state
from openjanus.train.cli import register
from openjanus.train.config import LoraSection, training_fields
from openjanus.train.distributed import DistributedContext
from openjanus.train.janus import JanusTask
from openjanus.train.lora import add_lora
from openjanus.train.runner import component_rows

TINY = Path(__file__).parent.parent / "configs" / "test-tiny.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 4, "alpha": 8, "target_modules": TARGETS}


def lora_recipe(init: Path, tokenizer: Path, steps: int = 4, **lora) -> dict:
    """One Janus stage on the conftest tiny model: LoRA on the LLM, the aligner and gen_head trained fully."""
    tiny = yaml.safe_load(TINY.read_text())
    stage = {"name": "lora", "task": "janus", "steps": steps, "batch_size": 4, "micro_batch_size": 2,
             "model": {"init": str(init), "train": ["language_model", "aligner", "gen_head"],
                       "lora": {**LORA, **lora}},
             "data": {"ratios": {"understanding": 1, "text": 1, "generation": 1}, "eval_batches": 0},
             "optim": {"lr": 1.0e-2}}
    return {"name": "lora", "tokenizer": {"file": str(tokenizer)}, "runtime": tiny["runtime"], "stages": [stage]}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, tokenizer_file) -> Path:
    """A 4-step LoRA stage, once."""
    root = tmp_path_factory.mktemp("lora")
    run(write_recipe(root / "lora.yaml", lora_recipe(tiny_model_dir, tokenizer_file)), run_dir=root / "run",
        echo=lambda _: None)
    return root / "run" / "lora"


def merged_target(key: str) -> bool:
    return key.startswith("language_model.") and key.split(".")[-2] in TARGETS


def test_only_adapters_and_listed_components_train(lora_run, tiny_model_dir):
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(lora_run / "output" / "model.safetensors")
    assert after.keys() == before.keys()  # the plain layout: no base_layer or lora_ keys
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    # In the LLM exactly the adapted linears changed (adapters merged); embeddings, norms and lm_head did not.
    assert {key for key in changed if key.startswith("language_model.")} == {k for k in before if merged_target(k)}
    assert {key.split(".")[0] for key in changed} == {"language_model", "aligner", "gen_head"}
    state = load_state(lora_run / "checkpoint.pt")["model"]
    bases = {key.removeprefix("model.").replace(".base_layer", ""): value for key, value in state.items()
             if ".base_layer." in key}
    assert bases.keys() == {k for k in before if merged_target(k)}
    assert all(torch.equal(value, before[key]) for key, value in bases.items())  # the base LLM stayed frozen
    assert all(state[key].abs().sum() > 0 for key in state if ".lora_B." in key)


def test_merged_output_gives_the_adapted_models_logits(lora_run, tiny_model_dir):
    merged = JanusPipeline.from_pretrained(lora_run / "output", device="cpu").model
    config = merged.config
    adapted = JanusModel(config)
    add_lora(adapted.language_model, LoraSection(**LORA))
    adapted.load_state_dict({key.removeprefix("model."): value
                             for key, value in load_state(lora_run / "checkpoint.pt")["model"].items()})
    original = JanusModel.from_pretrained(tiny_model_dir, device="cpu")
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))

    def logits(model: JanusModel) -> torch.Tensor:
        with torch.no_grad():
            hidden = model.eval().hidden_states(model.embed_text(ids))
            return torch.cat([model.text_logits(hidden), model.image_logits(hidden)], dim=-1)

    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=1e-5)
    assert (logits(merged) - logits(original)).abs().max() > 1e-2  # the adapters did learn something


def test_an_interrupted_lora_run_resumes_exactly(tmp_path, monkeypatch, tiny_model_dir, tokenizer_file):
    # Dropout on the adapters makes the run depend on the restored random state too.
    config = write_recipe(tmp_path / "resume.yaml", lora_recipe(tiny_model_dir, tokenizer_file, steps=6, dropout=0.1))
    run(config, run_dir=tmp_path / "straight", echo=lambda _: None)
    run_until_interrupted(config, tmp_path / "resumed", 5, monkeypatch)
    state = load_state(tmp_path / "resumed" / "lora" / "checkpoint.pt")
    assert state["step"] == 4 and any(".lora_A." in key for key in state["model"])
    run(config, run_dir=tmp_path / "resumed", echo=lambda _: None)

    def curve(run_dir: Path) -> list[dict]:
        lines = (run_dir / "lora" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")} for line in lines]

    assert [line["step"] for line in curve(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]
    assert curve(tmp_path / "straight") == curve(tmp_path / "resumed")
    straight = load_file(tmp_path / "straight" / "lora" / "output" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "lora" / "output" / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_dry_run_shows_the_adapters_apart_from_the_frozen_llm(tmp_path, tiny_model_dir, tokenizer_file):
    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:  # a second command, so that typer keeps `train` as a subcommand
        """Nothing."""

    config = write_recipe(tmp_path / "lora.yaml", lora_recipe(tiny_model_dir, tokenizer_file))
    result = CliRunner().invoke(app, ["train", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "LoRA on the LLM (r 4, alpha 8, dropout 0): q_proj, k_proj" in result.output
    assert any(line.split()[:2] == ["language_model", "LoRA"] for line in result.output.splitlines())

    recipe = recipe_from_dict(lora_recipe(tiny_model_dir, tokenizer_file))
    model = JanusModel.from_pretrained(tiny_model_dir, device="cpu")
    base = sum(p.numel() for p in model.language_model.parameters())
    JanusTask(recipe.stages[0], model, None, DistributedContext())
    linears = [m for n, m in model.language_model.named_modules() if n.split(".")[-1] in TARGETS]
    adapters = sum(4 * (m.in_features + m.out_features) for m in linears)
    assert component_rows("language_model", model.language_model) == [
        ("language_model", (0, base)), ("language_model LoRA", (adapters, 0))]
    assert component_rows("aligner", model.aligner) == [("aligner", (sum(p.numel() for p in model.aligner.parameters()),
                                                                     0))]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s["model"].update(train=["aligner"]), r"model\.lora adapts the LLM, so .*model\.train must list "
                                                     "'language_model'"),
    (lambda s: s["model"]["lora"].update(target_modules=["qkv"]), r"model\.lora\.target_modules: 'qkv' is not"),
    (lambda s: s["model"]["lora"].update(r=0), r"model\.lora\.r must be > 0"),
    (lambda s: s["model"]["lora"].update(rank=4), r"unknown config key 'stages\[0\]\.model\.lora\.rank'"),
    (lambda s: s["model"]["lora"].update(dropout="some"), r"'stages\[0\]\.model\.lora\.dropout' must be float"),
    (lambda s: s.update(task="encoder"), r"model\.lora: LoRA is for janus stages only"),
])
def test_invalid_lora_sections_name_the_key(tiny_model_dir, tokenizer_file, edit, message):
    recipe = lora_recipe(tiny_model_dir, tokenizer_file)
    edit(recipe["stages"][0])
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(recipe)


def test_stages_without_the_new_keys_keep_their_fingerprint(tiny_model_dir, tokenizer_file):
    recipe = lora_recipe(tiny_model_dir, tokenizer_file)
    plain = recipe_from_dict(recipe).stages[0]
    assert training_fields(plain)["model"]["lora"] == {**LORA, "alpha": 8.0, "dropout": 0.0}
    del recipe["stages"][0]["model"]["lora"]
    recipe["stages"][0]["data"]["skip_bad"] = True
    fields = training_fields(recipe_from_dict(recipe).stages[0])
    # Checkpoints written before LoRA, image roots and --skip-bad existed still resume.
    assert "lora" not in fields["model"] and not {"image_root", "skip_bad"} & fields["data"].keys()
