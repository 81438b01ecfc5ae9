"""FSDP2 on two processes (gloo, CPU): sharded torch.distributed.checkpoint checkpoints resume exactly (LoRA too),
activation checkpointing changes no loss, bf16 stages gather their blocks in bf16. And on one process: the sharded
format's atomic save, switching formats mid-run, and what --dry-run says about sharding."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import interrupted_after
from safetensors.torch import load_file

from openjanus import JanusPipeline
from openjanus.data import build_shapes_tokenizer
from openjanus.model.llm import DecoderLayer
from openjanus.train import load_recipe, recipe_from_dict, run
from openjanus.train import loop as loop_module
from openjanus.train.checkpoint import ResumeError, load_state, recover_sharded, swap_in
from openjanus.train.distributed import DistributedContext
from openjanus.train.loop import StageTrainer
from openjanus.train.runner import describe
from openjanus.train.tasks import transformer_activation_bytes

TINY = Path(__file__).parent.parent / "configs" / "test-tiny.yaml"
EVERYTHING = ["vision_model", "aligner", "gen_aligner", "gen_embed", "gen_head", "language_model"]
LORA = {"r": 4, "alpha": 8, "dropout": 0.1,  # dropout: the run also depends on every process's restored RNG
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def recipe(tokenizer: Path, steps: int = 6, lora: bool = False, **runtime) -> dict:
    """One Janus stage from scratch on the test-tiny model, 2 micro-batches per process, checkpoints every 2 steps."""
    tiny = yaml.safe_load(TINY.read_text())
    model = {"init": "scratch", "train": EVERYTHING}
    if lora:
        model = {"init": "scratch", "train": ["language_model", "aligner", "gen_head"], "lora": LORA}
    stage = {"name": "train", "task": "janus", "steps": steps, "batch_size": 8, "micro_batch_size": 2, "model": model,
             "data": {"ratios": {"understanding": 2, "text": 3, "generation": 5}, "eval_batches": 0},
             "optim": {"lr": 1.0e-3, "weight_decay": 0.1}}
    return {"name": "fsdp", "model": tiny["model"], "tokenizer": {"file": str(tokenizer)},
            "runtime": {**tiny["runtime"], "distributed": "fsdp", "checkpoint_format": "sharded", **runtime},
            "stages": [stage]}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    build_shapes_tokenizer(512, path)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def quiet(_message: str) -> None:
    pass


def worker(rank: int, world_size: int, port: int, root: str, jobs: list[tuple[str, int]]) -> None:
    """Run each (recipe name, step to interrupt after or 0) on this process; rank 0 notes what it saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo")
    root_dir = Path(root)
    train_step, layer_forward = StageTrainer.train_step, DecoderLayer.forward
    dtypes: set[str] = set()
    calls = []

    def probed_forward(self, *args, **kwargs):  # how often the LLM's blocks run, and their weights' dtype there
        dtypes.add(str(self.mlp.up_proj.weight.dtype))
        calls.append(1)
        return layer_forward(self, *args, **kwargs)

    DecoderLayer.forward = probed_forward
    try:
        for name, interrupt in jobs:
            config, run_dir, notes = root_dir / f"{name}.yaml", root_dir / name, {}
            dtypes.clear()
            calls.clear()
            if interrupt:
                StageTrainer.train_step = interrupted_after(interrupt)
                try:
                    run(config, run_dir=run_dir, echo=quiet)
                except KeyboardInterrupt:
                    pass
                finally:
                    StageTrainer.train_step = train_step
                checkpoint = run_dir / "train" / "checkpoint"
                state = load_state(checkpoint / "trainer.pt")
                notes.update(step=state["step"], rngs=len(state["rng"]), files=sorted(os.listdir(checkpoint)),
                             stage_files=sorted(os.listdir(run_dir / "train")))
            run(config, run_dir=run_dir, echo=quiet)
            if rank == 0:
                notes.update(dtypes=sorted(dtypes), calls=len(calls))
                (root_dir / f"{name}.json").write_text(json.dumps(notes))
    finally:
        StageTrainer.train_step, DecoderLayer.forward = train_step, layer_forward
        dist.destroy_process_group()


def two_processes(root: Path, recipes: dict[str, dict], jobs: list[tuple[str, int]]) -> dict[str, dict]:
    for name, data in recipes.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(data))
    mp.spawn(worker, args=(2, free_port(), str(root), jobs), nprocs=2)
    return {name: json.loads((root / f"{name}.json").read_text()) for name, _ in jobs}


def curve(run_dir: Path) -> list[dict]:
    lines = (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")} for line in lines]


def output(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "train" / "output" / "model.safetensors")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoints_resume_exactly_on_two_processes(tmp_path, tokenizer):
    config = recipe(tokenizer)
    notes = two_processes(tmp_path, {"straight": config, "resumed": config}, [("straight", 0), ("resumed", 5)])

    interrupted = notes["resumed"]
    assert interrupted["step"] == 4 and interrupted["rngs"] == 2  # every process's random state
    # One shard per process, DCP's metadata and the trainer state; no gathered checkpoint.pt, no leftovers.
    assert interrupted["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.pt"]
    assert interrupted["stage_files"] == ["checkpoint", "metrics.jsonl"]
    assert [line["step"] for line in curve(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]
    assert curve(tmp_path / "resumed") == curve(tmp_path / "straight")
    assert same(output(tmp_path / "resumed"), output(tmp_path / "straight"))
    # The stage output stays a plain full checkpoint that the pipeline loads.
    assert not (tmp_path / "resumed" / "train" / "checkpoint.pt").exists()
    pipe = JanusPipeline.from_pretrained(tmp_path / "resumed" / "train" / "output", device="cpu")
    assert pipe.model.state_dict().keys() == output(tmp_path / "resumed").keys()


def test_activation_checkpointing_and_bf16_gathers_under_fsdp(tmp_path, tokenizer):
    recipes = {"plain": recipe(tokenizer, steps=3),
               "checkpointed": recipe(tokenizer, steps=3, activation_checkpointing=True),
               "bf16": recipe(tokenizer, steps=3, precision="bf16")}
    notes = two_processes(tmp_path, recipes, [(name, 0) for name in recipes])

    assert notes["checkpointed"]["calls"] == 2 * notes["plain"]["calls"] > 0  # every block recomputed once
    plain, checkpointed = curve(tmp_path / "plain"), curve(tmp_path / "checkpointed")
    assert len(plain) == len(checkpointed) == 3
    for a, b in zip(plain, checkpointed, strict=True):
        for key in ("loss", "loss_understanding", "loss_text", "loss_generation", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    for key, value in output(tmp_path / "plain").items():
        torch.testing.assert_close(output(tmp_path / "checkpointed")[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # bf16: FSDP gathers the blocks' weights in bf16 (fp32 shards and optimizer); the numbers stay close.
    assert notes["plain"]["dtypes"] == ["torch.float32"] and notes["bf16"]["dtypes"] == ["torch.bfloat16"]
    for a, b in zip(plain, curve(tmp_path / "bf16"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
    assert all(value.dtype == torch.float32 for value in output(tmp_path / "bf16").values())


def test_lora_under_fsdp_resumes_from_sharded_checkpoints(tmp_path, tokenizer):
    config = recipe(tokenizer, lora=True)
    notes = two_processes(tmp_path, {"straight": config, "resumed": config}, [("straight", 0), ("resumed", 5)])

    assert notes["resumed"]["step"] == 4 and "__1_0.distcp" in notes["resumed"]["files"]
    assert curve(tmp_path / "resumed") == curve(tmp_path / "straight")
    merged = output(tmp_path / "resumed")
    assert not any("lora_" in key or "base_layer" in key for key in merged)  # adapters merged into the output
    assert same(merged, output(tmp_path / "straight"))


def test_switching_to_sharded_checkpoints_resumes_and_saves_atomically(tmp_path, tokenizer, monkeypatch):
    """One process: a full checkpoint resumed by a sharded run (with activation checkpointing turned on, which
    is no training setting), a Ctrl-C inside the sharded save, and a refused change of config."""
    full, sharded = recipe(tokenizer, checkpoint_format="full"), recipe(tokenizer, activation_checkpointing=True)
    paths = {}
    for name, data in {"full": full, "sharded": sharded}.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(data))
    run(paths["full"], run_dir=tmp_path / "straight", echo=quiet)
    stage_dir = tmp_path / "switched" / "train"
    run(paths["full"], run_dir=tmp_path / "switched", max_steps=3, echo=quiet)
    assert load_state(stage_dir / "checkpoint.pt")["step"] == 3

    real_save = loop_module.dcp.save

    def save_interrupted(state, checkpoint_id):
        Path(checkpoint_id).mkdir(parents=True)
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module.dcp, "save", save_interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(paths["sharded"], run_dir=tmp_path / "switched", echo=quiet)  # resumes at 3, stopped saving step 4
    assert load_state(stage_dir / "checkpoint.pt")["step"] == 3 and not (stage_dir / "checkpoint").exists()
    monkeypatch.setattr(loop_module.dcp, "save", real_save)
    run(paths["sharded"], run_dir=tmp_path / "switched", echo=quiet)

    assert sorted(os.listdir(stage_dir)) == ["checkpoint", "metrics.jsonl", "output"]  # checkpoint.pt replaced
    assert load_state(stage_dir / "checkpoint" / "trainer.pt")["step"] == 6
    assert curve(tmp_path / "switched") == curve(tmp_path / "straight")
    assert same(output(tmp_path / "switched"), output(tmp_path / "straight"))

    changed = recipe(tokenizer)
    changed["stages"][0]["optim"]["lr"] = 0.5
    paths["full"].write_text(yaml.safe_dump(changed))
    (stage_dir / "output" / "training.json").unlink()  # as if interrupted before the end
    with pytest.raises(ResumeError, match=r"checkpoint .*checkpoint was written by a different config "
                                          r"\(changed: optim\.lr\)"):
        run(paths["full"], run_dir=tmp_path / "switched", echo=quiet)


def test_a_crash_between_the_renames_keeps_the_previous_sharded_checkpoint(tmp_path):
    current, staging = tmp_path / "checkpoint", tmp_path / "checkpoint.tmp"
    current.mkdir()
    (current / "trainer.pt").write_text("step 2")
    staging.mkdir()
    (staging / "trainer.pt").write_text("step 4")
    os.replace(current, tmp_path / "checkpoint.old")  # swap_in's first rename, then the crash
    recover_sharded(current)
    assert (current / "trainer.pt").read_text() == "step 2"
    swap_in(staging, current)
    assert (current / "trainer.pt").read_text() == "step 4"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


@pytest.mark.parametrize(("edit", "message"), [
    ({"checkpoint_format": "dcp"}, r"runtime\.checkpoint_format must be full or sharded"),
    ({"activation_checkpointing": "yes"}, r"'runtime\.activation_checkpointing' must be bool"),
])
def test_invalid_runtime_keys_are_named(tokenizer, edit, message):
    data = recipe(tokenizer)
    data["runtime"].update(edit)
    with pytest.raises(Exception, match=message):
        recipe_from_dict(data)


def test_dry_run_divides_by_the_shards_and_counts_checkpointed_activations(tokenizer, tmp_path):
    assert transformer_activation_bytes(100, 64, 24, 2, checkpointing=True) < transformer_activation_bytes(
        100, 64, 24, 2) / 8
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(recipe(tokenizer)))

    def estimate(world_size: int, checkpointing: bool) -> tuple[list[str], dict[str, float]]:
        config = load_recipe(path)
        config.model = "janus-pro-1b"  # built on the meta device: big enough for GiB
        config.runtime.activation_checkpointing = checkpointing
        lines = []
        describe(config, DistributedContext(world_size=world_size), lines.append)
        found = re.search(r"~([\d.]+) GiB \(weights ([\d.]+), grads\+AdamW ([\d.]+), activations ~([\d.]+)",
                          lines[-1])
        return lines, dict(zip(("total", "weights", "optimizer", "activations"), map(float, found.groups())))

    one = estimate(1, False)[1]
    lines, two = estimate(2, True)
    assert "FSDP over 2 processes: weights, grads and AdamW sharded; activation checkpointing; sharded checkpoints" \
        in "\n".join(lines)
    assert two["optimizer"] == pytest.approx(one["optimizer"] / 2, abs=0.01)
    assert two["weights"] < one["weights"] and two["activations"] < one["activations"]
