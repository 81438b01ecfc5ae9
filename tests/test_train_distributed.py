"""Two processes (gloo, CPU) train exactly like one process at the same global batch: DDP, FSDP2, SigLIP gather."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from openjanus.data import build_shapes_tokenizer
from openjanus.train import run

TINY = Path(__file__).parent.parent / "configs" / "test-tiny.yaml"
RUNS = {"janus-ddp": ("janus", "ddp"), "janus-fsdp": ("janus", "fsdp"), "encoder-ddp": ("encoder", "ddp")}
VQ_RUN = "vq-ddp"  # codebook restarts draw from the main process's latents: no parity, but no deadlock either


def recipe(task: str, strategy: str, tokenizer: Path) -> dict:
    tiny = yaml.safe_load(TINY.read_text())
    if task == "vq":
        stage = {**tiny["stages"][0], "name": "train", "steps": 4, "loss": {"codebook_restart_every": 2}}
        stage["data"] = {**stage["data"], "eval_images": 0}
    elif task == "janus":
        stage = {"name": "train", "task": "janus", "steps": 3, "batch_size": 8, "micro_batch_size": 4,
                 "model": {"init": "scratch", "train": ["vision_model", "aligner", "gen_aligner", "gen_embed",
                                                        "gen_head", "language_model"]},
                 "data": {"ratios": {"understanding": 2, "text": 3, "generation": 5}, "eval_batches": 1},
                 "optim": {"lr": 1.0e-3, "weight_decay": 0.1}}
    else:  # the whole per-process batch in one pass: the contrastive batch is all 8 pairs either way
        stage = {"name": "train", "task": "encoder", "steps": 3, "batch_size": 8,
                 "model": {"init": "scratch", "train": ["vision_model"],
                           "text_tower": {"width": 32, "layers": 1, "heads": 2, "max_length": 48, "embed_dim": 32}},
                 "data": {"eval_batches": 1}, "optim": {"lr": 1.0e-3}}
    return {"name": "parity", "model": tiny["model"], "tokenizer": {"file": str(tokenizer)},
            "runtime": {**tiny["runtime"], "distributed": strategy}, "stages": [stage]}


def worker(rank: int, world_size: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo")  # one group for all runs; `run` leaves a group it did not create alone
    try:
        for name in [*RUNS, VQ_RUN]:
            run(Path(root) / f"{name}.yaml", run_dir=Path(root) / "two" / name, echo=lambda _: None)
    finally:
        dist.destroy_process_group()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    build_shapes_tokenizer(512, tokenizer)
    for name, (task, strategy) in [*RUNS.items(), (VQ_RUN, ("vq", "ddp"))]:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe(task, strategy, tokenizer)))
    for name in ("janus-ddp", "encoder-ddp"):  # one process ignores the strategy: one reference per task
        run(tmp_path / f"{name}.yaml", run_dir=tmp_path / "one" / name, echo=lambda _: None)

    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2)

    for name, (task, _) in RUNS.items():
        reference, distributed = tmp_path / "one" / f"{task}-ddp", tmp_path / "two" / name
        expected, got = metrics(reference), metrics(distributed)
        assert [m["step"] for m in got] == [1, 2, 3, 3]
        for a, b in zip(expected, got):
            for key in ("loss", "eval_loss", "grad_norm", "accuracy"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (name, a["step"], key)
        one, two = (load_file(d / "train" / "output" / "model.safetensors") for d in (reference, distributed))
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    restarts = [m.get("codes_restarted") for m in metrics(tmp_path / "two" / VQ_RUN)]
    assert restarts[:4] == [None, restarts[1], None, restarts[3]] and restarts[1] > 0
