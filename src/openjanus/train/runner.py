"""Running a recipe: its stages in order, each starting from the previous stage's output.

Run directory (default ~/.cache/openjanus/runs/<recipe name>/):

    tokenizer.json                  built once (ShapesWorld) unless the recipe names one
    <stage>/checkpoint.pt           full training state, for resuming (runtime.checkpoint_format: full)
    <stage>/checkpoint/             the same as a sharded torch.distributed.checkpoint directory (sharded)
    <stage>/metrics.jsonl           one line per logged step, then the held-out metrics
    <stage>/output/                 the stage's model: JanusPipeline.from_pretrained(<stage>/output)
    <stage>/output/training.json    what produced it (config fingerprint, steps, final metrics)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ConfigError, JanusConfig
from ..data.files import DataError, scan_data_file
from ..data.tokenizer import build_shapes_tokenizer
from ..model import JanusModel
from ..processing.tokenizer import TOKENIZER_FILE, JanusTokenizer
from ..weights import load_checkpoint, read_config, save_checkpoint
from .checkpoint import check_resumable, remove_checkpoints
from .config import RecipeConfig, StageConfig, load_recipe, training_fields
from .distributed import DistributedContext, barrier, init_distributed
from .encoder import EncoderTask
from .janus import JanusTask
from .loop import METRICS_FILE, StageTrainer, micro_batch_plan
from .lora import is_lora_parameter
from .tasks import Task, count_parameters, initialize_weights
from .vq import VQTask

RUNS_DIR = Path("~/.cache/openjanus/runs")
OUTPUT_DIR = "output"
SUMMARY_FILE = "training.json"
TASK_CLASSES: dict[str, type[Task]] = {"vq": VQTask, "encoder": EncoderTask, "janus": JanusTask}


def default_run_dir(name: str) -> Path:
    """Where a recipe's run lives unless --run-dir says otherwise."""
    return (RUNS_DIR / name).expanduser()


def run(config_path: str | os.PathLike, resume: bool = True, run_dir: str | os.PathLike | None = None,
        max_steps: int | None = None, dry_run: bool = False, stage: str | None = None,
        echo: Callable[[str], None] = print, skip_bad: bool = False) -> Path | None:
    """Train a recipe (or only its stage `stage`); returns the last output directory written.

    With `resume`, finished stages are skipped and an interrupted one continues from its
    checkpoint; without it, the selected stages start over. `max_steps` caps every stage (smoke
    runs; a later run resumes past it). `dry_run` prints the plan and trains nothing. `skip_bad`
    skips bad records of data files (as `data.skip_bad` does) instead of refusing to start.
    """
    recipe = load_recipe(config_path)
    if stage is not None and stage not in recipe.stage_names():
        raise ConfigError(f"no stage named '{stage}' in {config_path}; stages: {', '.join(recipe.stage_names())}")
    if max_steps is not None and max_steps < 1:
        raise ConfigError("--max-steps must be >= 1")
    if skip_bad:
        for stage_config in recipe.stages:
            stage_config.data.skip_bad = True
    data_reports = check_inputs(recipe)
    owns_process_group = not dist.is_initialized()
    context = init_distributed(recipe.runtime.device)
    main_echo = echo if context.is_main else (lambda _message: None)
    for report in data_reports:
        main_echo(report)
    try:
        if dry_run:
            describe(recipe, context, main_echo)
            return None
        run_dir = Path(run_dir).expanduser() if run_dir is not None else default_run_dir(recipe.name)
        tokenizer_file = prepare_tokenizer(recipe, run_dir, context, resume)
        tokenizer = JanusTokenizer.from_file(tokenizer_file)
        last_output = None
        for index, stage_config in enumerate(recipe.stages):
            if stage is None or stage_config.name == stage:
                last_output = run_stage(recipe, index, run_dir, tokenizer, tokenizer_file, context, resume,
                                        max_steps, main_echo)
        return last_output
    finally:
        if owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def check_inputs(recipe: RecipeConfig) -> list[str]:
    """Every file the recipe names exists and every record of its data files is usable, before anything trains.

    Returns one line per data file with skipped records (`data.skip_bad`); a bad record otherwise
    raises ConfigError naming the stage, the file and the line.
    """
    if recipe.tokenizer.file and not Path(recipe.tokenizer.file).expanduser().is_file():
        raise ConfigError(f"tokenizer file not found: {recipe.tokenizer.file}")
    reports = []
    for stage in recipe.stages:
        init = stage.model.init
        if init not in ("previous", "scratch") and not (Path(init).expanduser() / "config.json").is_file():
            raise ConfigError(f"stage {stage.name}: checkpoint directory not found: {init} (model.init)")
        for kind, path in stage.data.files.items():
            try:
                index = scan_data_file(path, kind, stage.data.image_root or None, stage.data.skip_bad)
            except (FileNotFoundError, DataError) as exc:
                raise ConfigError(f"stage {stage.name}: {exc}") from None
            if index.bad:
                reports.append(f"stage {stage.name}: {index.skipped_summary()}")
    return reports


def prepare_tokenizer(recipe: RecipeConfig, run_dir: Path, context: DistributedContext, resume: bool) -> Path:
    """The recipe's tokenizer.json, or the ShapesWorld tokenizer built (once) into the run directory."""
    if recipe.tokenizer.file:
        return Path(recipe.tokenizer.file).expanduser()
    path = run_dir / TOKENIZER_FILE
    if context.is_main and not (resume and path.exists()):
        vocab_size = recipe.tokenizer.vocab_size or recipe.janus_config().llm.vocab_size
        build_shapes_tokenizer(vocab_size, path)
    barrier(context)
    return path


def stage_dirs(run_dir: Path, stage: StageConfig) -> tuple[Path, Path]:
    """(stage directory, output directory)."""
    return run_dir / stage.name, run_dir / stage.name / OUTPUT_DIR


def read_summary(output_dir: Path) -> dict | None:
    """The training.json of a stage output, or None when the stage has no output yet."""
    path = output_dir / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def architecture(recipe: RecipeConfig, index: int) -> JanusConfig:
    """The model architecture stage `index` trains (without loading any weights)."""
    init = recipe.stages[index].model.init
    while init == "previous":
        index -= 1
        init = recipe.stages[index].model.init
    return recipe.janus_config() if init == "scratch" else read_config(Path(init).expanduser())[0]


def initial_model(recipe: RecipeConfig, index: int, run_dir: Path) -> JanusModel:
    """Stage `index`'s starting model: freshly initialised, the previous stage's output, or a checkpoint."""
    stage = recipe.stages[index]
    if stage.model.init == "scratch":
        torch.manual_seed(stage.seed)
        model = JanusModel(recipe.janus_config())
        initialize_weights(model)
        return model.train()
    if stage.model.init == "previous":
        previous = recipe.stages[index - 1]
        path = stage_dirs(run_dir, previous)[1]
        if read_summary(path) is None:
            raise ConfigError(f"stage {stage.name} starts from stage {previous.name}'s output, which does not exist "
                              f"yet ({path}); run that stage first")
    else:
        path = Path(stage.model.init).expanduser()
    return load_checkpoint(path, device="cpu", dtype=torch.float32).model.train()


def run_stage(recipe: RecipeConfig, index: int, run_dir: Path, tokenizer: JanusTokenizer, tokenizer_file: Path,
              context: DistributedContext, resume: bool, max_steps: int | None,
              echo: Callable[[str], None]) -> Path:
    """Train one stage (or skip it when its output is already complete) and write its output directory."""
    stage = recipe.stages[index]
    runtime = recipe.stage_runtime(stage)
    stage_dir, output_dir = stage_dirs(run_dir, stage)
    fingerprint = recipe.stage_hash(index)
    target = min(stage.steps, max_steps) if max_steps else stage.steps
    summary = read_summary(output_dir)
    if resume and summary is not None:
        check_resumable(summary, fingerprint, training_fields(stage), output_dir / SUMMARY_FILE)
        if summary["step"] >= target:
            echo(f"{stage.name}: done ({summary['step']}/{stage.steps} steps), skipping")
            return output_dir
    if not resume and context.is_main:
        remove_checkpoints(stage_dir)
        (stage_dir / METRICS_FILE).unlink(missing_ok=True)
    barrier(context)
    threads = torch.get_num_threads()
    torch.set_num_threads(runtime.threads or threads)
    try:
        trainer = stage_trainer(recipe, index, run_dir, tokenizer, context, echo)
        result = trainer.run(resume, max_steps)
        trained = trainer.export_model()
    finally:
        torch.set_num_threads(threads)
    if context.is_main:
        metrics = {**result.metrics, **trainer.task.evaluate(trained)}
        write_output(trained, output_dir, tokenizer_file, {
            "stage": stage.name, "task": stage.task, "step": result.step, "steps": stage.steps,
            "config_hash": fingerprint, "stage_config": training_fields(stage), "metrics": metrics})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k == "loss" or k.startswith("eval_"))
        echo(f"{stage.name}: step {result.step}/{stage.steps}; {shown}; model in {output_dir}")
    barrier(context)
    return output_dir


def stage_trainer(recipe: RecipeConfig, index: int, run_dir: Path, tokenizer: JanusTokenizer,
                   context: DistributedContext, echo: Callable[[str], None]) -> StageTrainer:
    """The stage's starting model, its task and the trainer around them."""
    stage = recipe.stages[index]
    model = initial_model(recipe, index, run_dir)
    if tokenizer.vocab_size > model.config.llm.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                          f"{model.config.llm.vocab_size} embeddings")
    torch.manual_seed(stage.seed)
    task = TASK_CLASSES[stage.task](stage, model, tokenizer, context)
    return StageTrainer(task, stage, recipe.stage_runtime(stage), context, stage_dirs(run_dir, stage)[0],
                        recipe.stage_hash(index), echo)


def write_output(model: JanusModel, output_dir: Path, tokenizer_file: Path, summary: dict) -> None:
    """Write the stage's model directory next to the old one, then swap it in."""
    staging = output_dir.with_name(output_dir.name + ".tmp")
    retired = output_dir.with_name(output_dir.name + ".old")
    for leftover in (staging, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    save_checkpoint(model, staging, tokenizer_file=tokenizer_file)
    (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if output_dir.exists():
        os.replace(output_dir, retired)
    os.replace(staging, output_dir)
    shutil.rmtree(retired, ignore_errors=True)


def _millions(count: int) -> str:
    return f"{count / 1e6:8.2f}M"


def component_rows(name: str, module: torch.nn.Module) -> list[tuple[str, tuple[int, int]]]:
    """(row name, (trainable, frozen)) of a component; its LoRA adapters, if any, get a row of their own."""
    adapters = [p for n, p in module.named_parameters() if is_lora_parameter(n)]
    if not adapters:
        return [(name, count_parameters(module))]
    trainable, frozen = count_parameters(module)
    adapter_trainable = sum(p.numel() for p in adapters if p.requires_grad)
    adapter_frozen = sum(p.numel() for p in adapters) - adapter_trainable
    return [(name, (trainable - adapter_trainable, frozen - adapter_frozen)),
            (f"{name} LoRA", (adapter_trainable, adapter_frozen))]


def describe(recipe: RecipeConfig, context: DistributedContext, echo: Callable[[str], None]) -> None:
    """Print, per stage, parameters by component (trainable and frozen) and a memory estimate per device."""
    world = context.world_size
    echo(f"recipe {recipe.name}: {len(recipe.stages)} stages, {world} process(es) on {context.device.type}")
    for index, stage in enumerate(recipe.stages):
        runtime = recipe.stage_runtime(stage)
        micro, accumulation = micro_batch_plan(stage, world)
        with torch.device("meta"):
            model = JanusModel(architecture(recipe, index))
            task = TASK_CLASSES[stage.task](stage, model, None, context)
        echo(f"\n[{index + 1}] {stage.name} ({stage.task}): {stage.steps} steps, global batch {stage.batch_size} "
             f"= {world} x {micro} x {accumulation} accumulation, lr {stage.optim.lr:g} {stage.optim.schedule}, "
             f"{runtime.precision}")
        lora = stage.model.lora
        if lora is not None:
            echo(f"    LoRA on the LLM (r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}): "
                 f"{', '.join(lora.target_modules)}; merged into the output")
        echo(f"    {'component':22s} {'trainable':>10s} {'frozen':>10s}")
        in_model = set()
        for name, child in model.named_children():
            in_model.update(id(p) for p in child.parameters())
            for row, (trainable, frozen) in component_rows(name, child):
                echo(f"    {row:22s} {_millions(trainable):>10s} {_millions(frozen):>10s}")
        extra = [p for p in task.objective.parameters() if id(p) not in in_model]
        if extra:
            extra_count = _millions(sum(p.numel() for p in extra))
            echo(f"    {'(trainer-only heads)':22s} {extra_count:>10s} {_millions(0):>10s}")
        trainable, frozen = count_parameters(task.objective)
        sharded = runtime.distributed == "fsdp" and world > 1
        shards = world if sharded else 1
        weights = (trainable + frozen) * 4 / shards
        optimizer = trainable * (4 + 8) / shards  # gradients + AdamW moments, fp32
        if sharded:  # gathered whole (in bf16 under bf16): the root's own weights, and one block at a time
            units = [sum(p.numel() for p in unit.parameters()) for unit in task.shard_units()]
            gathered = trainable + frozen - sum(units) + max(units, default=0)
            weights += gathered * (2 if runtime.precision == "bf16" else 4) * (world - 1) / world
        activations = task.activation_bytes(micro, 2 if runtime.precision == "bf16" else 4,
                                            runtime.activation_checkpointing)
        total = weights + optimizer + activations
        if sharded or runtime.activation_checkpointing:
            notes = [f"FSDP over {world} processes: weights, grads and AdamW sharded"] if sharded else []
            notes += ["activation checkpointing"] if runtime.activation_checkpointing else []
            notes += [f"{runtime.checkpoint_format} checkpoints"]
            echo(f"    {'; '.join(notes)}")
        echo(f"    total {_millions(trainable + frozen).strip()} parameters, {_millions(trainable).strip()} trainable; "
             f"memory per device ~{total / 2**30:.2f} GiB (weights {weights / 2**30:.2f}, grads+AdamW "
             f"{optimizer / 2**30:.2f}, activations ~{activations / 2**30:.2f}, rough)")
