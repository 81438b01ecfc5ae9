"""The one training loop every stage runs, on one process or many.

Per step: every process builds its micro-batches from the step number (data position = step),
the loss of each micro-batch is its summed loss times world_size / (global supervised units),
so after DDP's or FSDP's gradient averaging the gradient is the global-batch mean whatever
the split over processes and accumulation. Then clipping, AdamW, the schedule, metrics
(JSON Lines) and, every N steps or minutes, an atomic checkpoint from which a resumed run
continues bit for bit: one full file gathered on the main process, or (`checkpoint_format:
sharded`) a torch.distributed.checkpoint directory to which every process writes its own shard.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from tqdm.auto import tqdm

from ..config import ConfigError
from ..model import JanusModel
from .checkpoint import (
    CHECKPOINT_FILE,
    SHARDED_DIR,
    TRAINER_FILE,
    atomic_save,
    check_resumable,
    load_state,
    recover_sharded,
    rng_state,
    set_rng_state,
    staging_paths,
    swap_in,
)
from .config import OptimConfig, RuntimeConfig, StageConfig, training_fields
from .distributed import (
    DistributedContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_flag,
    checkpoint_activations,
    gradient_sync,
    wrap_model,
)
from .tasks import Task

METRICS_FILE = "metrics.jsonl"
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class StageResult:
    """Where a stage stopped and its last metrics (held-out ones prefixed `eval_`)."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)


def build_optimizer(objective: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only."""
    matrices, others = [], []
    for parameter in objective.parameters():
        if parameter.requires_grad:
            (matrices if parameter.ndim >= 2 else others).append(parameter)
    groups = [{"params": matrices, "weight_decay": optim.weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=tuple(optim.betas),
                             eps=optim.eps)


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning-rate multiplier: linear warmup, then constant or cosine down to `min_lr_ratio`."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min((step - optim.warmup_steps) / max(total_steps - optim.warmup_steps, 1), 1.0)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def micro_batch_plan(stage: StageConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) per process for the stage's global batch."""
    if stage.batch_size % world_size:
        raise ConfigError(f"stage {stage.name}: batch_size {stage.batch_size} is not divisible by "
                          f"{world_size} processes")
    per_process = stage.batch_size // world_size
    micro = stage.micro_batch_size or per_process
    if per_process % micro:
        raise ConfigError(f"stage {stage.name}: micro_batch_size {micro} does not divide the per-process "
                          f"batch of {per_process}")
    return micro, per_process // micro


def micro_batch_slots(task: Task, step: int, micro: int, accumulation: int,
                      context: DistributedContext) -> list[list[int]]:
    """This process's share of the global batch (a contiguous block), split into micro-batches.

    The task may reorder its share first (Janus groups samples by kind so that micro-batches
    pad less); the gradient does not depend on the grouping, only on the set of samples.
    """
    share = micro * accumulation
    ordered = task.order_slots(step, list(range(context.rank * share, (context.rank + 1) * share)))
    return [ordered[m * micro:(m + 1) * micro] for m in range(accumulation)]


class MetricsLog:
    """metrics.jsonl of a stage; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if resume_step and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)

    def write(self, record: dict) -> None:
        """Append one record."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class LogWindow:
    """Metrics and throughput accumulated between two log lines."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}
        self.units, self.seconds = 0.0, 0.0

    def add(self, metrics: dict[str, float], units: float, seconds: float) -> None:
        """Record one step."""
        for name, value in metrics.items():
            self.values.setdefault(name, []).append(value)
        self.units += units
        self.seconds += seconds

    @property
    def rate(self) -> float:
        """Units (tokens, images or pairs) per second."""
        return self.units / max(self.seconds, 1e-9)

    def means(self) -> dict[str, float]:
        """Mean of every metric over the window."""
        return {name: sum(values) / len(values) for name, values in self.values.items()}


def _reduce_metrics(sums: dict[str, list[torch.Tensor]], context: DistributedContext) -> dict[str, float]:
    """Global sum / global count of every metric."""
    if not sums:
        return {}
    names = sorted(sums)
    packed = torch.stack([torch.stack([sums[n][0], sums[n][1]]) for n in names]).double()
    packed = all_reduce_sum(packed.to(context.device), context).cpu()
    return {n: float(total / count) for n, (total, count) in zip(names, packed) if count > 0}


def _accumulate(sums: dict[str, list[torch.Tensor]], metrics: dict) -> None:
    for name, (total, count) in metrics.items():
        total, count = total.detach().double(), torch.as_tensor(count).detach().double().to(total.device)
        if name in sums:
            sums[name][0] += total
            sums[name][1] += count
        else:
            sums[name] = [total.clone(), count.clone()]


@contextmanager
def _quiet_single_process():
    """DCP warns on every save or load without a process group; one process is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _grad_norm(objective: nn.Module, max_norm: float) -> float:
    """Clip the trainable gradients to `max_norm` (0 = only measure) and return their total norm."""
    parameters = [p for p in objective.parameters() if p.grad is not None]
    if not parameters:
        return 0.0
    norm = nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


class StageTrainer:
    """Runs one stage of a recipe: wraps the task's objective, trains, checkpoints and resumes."""

    def __init__(self, task: Task, stage: StageConfig, runtime: RuntimeConfig, context: DistributedContext,
                 stage_dir: Path, fingerprint: str, echo: Callable[[str], None] = print):
        self.task, self.stage, self.runtime, self.context = task, stage, runtime, context
        self.stage_dir, self.fingerprint, self.echo = stage_dir, fingerprint, echo
        device = context.device
        self.objective = task.objective.to(device)
        task.on_device(device, runtime.distributed)
        if runtime.activation_checkpointing:
            checkpoint_activations(task.shard_units())
        # bf16 under FSDP: blocks are gathered and run in bf16 (fp32 shards, fp32 gradient reduction).
        param_dtype = torch.bfloat16 if runtime.precision == "bf16" else None
        self.wrapped = wrap_model(self.objective, runtime.distributed, context, task.shard_units(), param_dtype)
        self.optimizer = build_optimizer(self.objective, stage.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_factor, optim=stage.optim, total_steps=stage.steps))
        self.micro, self.accumulation = micro_batch_plan(stage, context.world_size)
        self.sharded = runtime.checkpoint_format == "sharded"
        formats = [stage_dir / SHARDED_DIR, stage_dir / CHECKPOINT_FILE]
        # The checkpoint this run writes, then the other format's (a run may switch formats and resume).
        self.checkpoint_path, self.other_checkpoint = formats if self.sharded else formats[::-1]
        self.step = 0

    def autocast(self):
        """bf16 autocast when the stage asks for it (weights and optimizer stay fp32; under FSDP the blocks'
        gathered weights are bf16 already, and autocast still keeps its fp32 ops in fp32)."""
        if self.runtime.precision != "bf16":
            return nullcontext()
        return torch.autocast(self.context.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """Write the training state atomically in the run's format (collective: every process takes part)."""
        rngs = all_gather_objects(rng_state(), self.context)
        trainer = {"step": self.step, "samples": self.step * self.stage.batch_size,
                   "config_hash": self.fingerprint, "stage_config": training_fields(self.stage),
                   "scheduler": self.scheduler.state_dict(), "task": self.task.state_dict(),
                   "rng": rngs, "world_size": self.context.world_size}
        if self.sharded:
            self._save_sharded(trainer)
        else:
            model_state, optimizer_state = get_state_dict(self.objective, self.optimizer, options=FULL_STATE)
            if self.context.is_main:
                atomic_save({**trainer, "model": model_state, "optimizer": optimizer_state}, self.checkpoint_path)
        if self.context.is_main:  # an older checkpoint of the other format would only confuse a resume
            if self.other_checkpoint.is_dir():
                shutil.rmtree(self.other_checkpoint)
            else:
                self.other_checkpoint.unlink(missing_ok=True)
        barrier(self.context)

    def _save_sharded(self, trainer: dict) -> None:
        """Every process writes its shards into a staging directory, which then replaces the checkpoint."""
        model_state, optimizer_state = get_state_dict(self.objective, self.optimizer)
        staging = staging_paths(self.checkpoint_path)[0]
        if self.context.is_main:
            recover_sharded(self.checkpoint_path)
            shutil.rmtree(staging, ignore_errors=True)
        barrier(self.context)
        with _quiet_single_process():
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging)
        if self.context.is_main:
            atomic_save(trainer, staging / TRAINER_FILE)
            swap_in(staging, self.checkpoint_path)

    def restore(self) -> bool:
        """Load the stage's checkpoint (either format) if there is one; refuse one written by another config."""
        if self.context.is_main:
            recover_sharded(self.stage_dir / SHARDED_DIR)
        barrier(self.context)
        path = next((p for p in (self.checkpoint_path, self.other_checkpoint) if p.exists()), None)
        if path is None:
            return False
        sharded = path.is_dir()
        state = load_state(path / TRAINER_FILE if sharded else path)
        check_resumable(state, self.fingerprint, training_fields(self.stage), path)
        if sharded:  # DCP reads into this process's shards (resharding if the number of processes changed)
            model_state, optimizer_state = get_state_dict(self.objective, self.optimizer)
            tensors = {"model": model_state, "optimizer": optimizer_state}
            with _quiet_single_process():
                dcp.load(tensors, checkpoint_id=path)
            set_state_dict(self.objective, self.optimizer, model_state_dict=tensors["model"],
                           optim_state_dict=tensors["optimizer"])
        else:
            set_state_dict(self.objective, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        self.task.load_state_dict(state["task"])
        set_rng_state(state["rng"][min(self.context.rank, len(state["rng"]) - 1)])
        self.step = int(state["step"])
        return True

    # ------------------------------------------------------------------ training

    def train_step(self) -> tuple[dict[str, float], float]:
        """One optimizer step; returns the global metrics and the units processed by all processes."""
        task, context = self.task, self.context
        batches = [task.batch(self.step, slots)
                   for slots in micro_batch_slots(task, self.step, self.micro, self.accumulation, context)]
        totals = torch.tensor([float(sum(task.count(b) for b in batches)), float(sum(task.tokens(b) for b in batches))],
                              dtype=torch.float64, device=context.device)
        global_count, global_tokens = all_reduce_sum(totals, context).tolist()
        scale = context.world_size / max(global_count, 1.0)
        sums: dict[str, list[torch.Tensor]] = {}
        outputs = []
        for index, batch in enumerate(batches):
            with gradient_sync(self.wrapped, index == len(batches) - 1):
                with self.autocast():
                    out = self.wrapped(batch.to(context.device))
                (out.loss_sum * scale).backward()
            _accumulate(sums, out.metrics)
            outputs.append(out.outputs)
        grad_norm = _grad_norm(self.objective, self.stage.optim.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = _reduce_metrics(sums, context)
        metrics.update(task.after_step(self.step, outputs), lr=lr, grad_norm=grad_norm)
        self.step += 1
        return metrics, global_tokens

    @torch.no_grad()
    def evaluate_held_out(self) -> dict[str, float]:
        """Metrics of the held-out batches (same split over processes as training), prefixed `eval_`."""
        sums: dict[str, list[torch.Tensor]] = {}
        for step in range(self.stage.data.eval_batches):
            for slots in micro_batch_slots(self.task, step, self.micro, self.accumulation, self.context):
                with self.autocast():
                    out = self.wrapped(self.task.batch(step, slots, split="validation").to(self.context.device))
                _accumulate(sums, out.metrics)
        return {f"eval_{name}": value for name, value in _reduce_metrics(sums, self.context).items()}

    def run(self, resume: bool, max_steps: int | None = None) -> StageResult:
        """Train from the checkpoint (when resuming) or from the start up to `steps` (or `max_steps`)."""
        stage, runtime, context = self.stage, self.runtime, self.context
        if not (resume and self.restore()):
            self.task.on_start()
        end = min(stage.steps, max_steps) if max_steps else stage.steps
        log = MetricsLog(self.stage_dir / METRICS_FILE, self.step) if context.is_main else None
        if self.step and context.is_main:
            self.echo(f"{stage.name}: resuming at step {self.step}/{stage.steps}")
        bar = tqdm(total=end, initial=self.step, desc=stage.name, unit="step", dynamic_ncols=True,
                   disable=not (context.is_main and runtime.progress))
        window, unit = LogWindow(), self.task.throughput_unit
        last_save, saved_step = time.monotonic(), self.step
        metrics: dict[str, float] = {}
        try:
            while self.step < end:
                started = time.perf_counter()
                metrics, units = self.train_step()
                window.add(metrics, units, time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix({"loss": f"{metrics.get('loss', float('nan')):.4f}", f"{unit}/s": f"{window.rate:.0f}"})
                if self.step % runtime.log_every == 0 or self.step == end:
                    if log is not None:
                        log.write({"step": self.step, **window.means(), f"{unit}_per_s": window.rate})
                    window = LogWindow()
                overdue = time.monotonic() - last_save >= runtime.checkpoint_every_minutes * 60
                if self.step < end and (self.step % runtime.checkpoint_every_steps == 0
                                        or broadcast_flag(overdue, context)):
                    self.save()
                    last_save, saved_step = time.monotonic(), self.step
            if saved_step != self.step or not self.checkpoint_path.exists():
                self.save()
        finally:
            bar.close()
        held_out = self.evaluate_held_out()
        if log is not None and held_out:
            log.write({"step": self.step, **held_out})
        return StageResult(self.step, {**metrics, **held_out})

    def export_model(self) -> JanusModel | None:
        """The trained JanusModel, unsharded, on the main process's CPU (None on the others)."""
        state = get_model_state_dict(self.objective, options=FULL_STATE)
        if not self.context.is_main:
            return None
        prefix = "model."
        return self.task.plain_model({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}).eval()
