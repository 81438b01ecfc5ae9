"""Training-step speed of a Janus stage with openjanus's CPU kernel choices against torch's defaults.

Two of the trainer's choices are timed against the plain torch calls they replace, in one run on the
same steps (same data, same starting weights), interleaved in blocks so that drift on a shared machine
hits both alike:

- attention that trains in bf16 on the CPU runs in float32 (`openjanus.model.kernels.attention`),
  against `F.scaled_dot_product_attention` under bf16 autocast;
- the frozen VQ encodes generation images channels-last (`GENERATION_PIXELS_FORMAT`), against NCHW.

The stage is the shapes-tiny recipe's stage3 (batch 32 in micro-batches of 16, bf16 autocast) on
freshly initialised weights: step time does not depend on the weights' values.

    python benchmarks/train_step.py [--stage stage3] [--blocks 4] [--steps-per-block 10]
"""

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import openjanus.model.llm as llm
import openjanus.model.vision as vision
import openjanus.train.janus as janus
from openjanus.model.kernels import attention
from openjanus.processing.tokenizer import JanusTokenizer
from openjanus.train.config import load_recipe
from openjanus.train.distributed import DistributedContext
from openjanus.train.runner import prepare_tokenizer, stage_trainer

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "shapes-tiny.yaml"
VARIANTS = {  # name: (attention function, generation pixels' memory format)
    "torch defaults (bf16 attention, NCHW encoding)": (F.scaled_dot_product_attention, torch.contiguous_format),
    "openjanus (float32 training attention, channels-last encoding)": (attention, torch.channels_last),
}


@contextlib.contextmanager
def kernels(attend, pixels_format):
    saved = llm.attention, vision.attention, janus.GENERATION_PIXELS_FORMAT
    llm.attention = vision.attention = attend
    janus.GENERATION_PIXELS_FORMAT = pixels_format
    try:
        yield
    finally:
        llm.attention, vision.attention, janus.GENERATION_PIXELS_FORMAT = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="stage3", help="a janus stage of configs/shapes-tiny.yaml")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--steps-per-block", type=int, default=10)
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    index = recipe.stage_names().index(args.stage)
    stage = recipe.stages[index]
    if stage.task != "janus":
        parser.error(f"{args.stage} is a {stage.task} stage; this benchmark times janus stages")
    stage.model.init = "scratch"
    context = DistributedContext()
    with tempfile.TemporaryDirectory() as run_dir:
        tokenizer = JanusTokenizer.from_file(prepare_tokenizer(recipe, Path(run_dir), context, resume=False))
        trainers = {name: stage_trainer(recipe, index, Path(run_dir) / str(i), tokenizer, context, lambda _: None)
                    for i, name in enumerate(VARIANTS)}
        seconds = {name: [] for name in VARIANTS}
        for block in range(args.blocks + 1):  # block 0 warms up
            for name, trainer in trainers.items():
                with kernels(*VARIANTS[name]):
                    started = time.perf_counter()
                    for _ in range(args.steps_per_block):
                        trainer.train_step()
                    if block:
                        seconds[name].append((time.perf_counter() - started) / args.steps_per_block)
    print(f"{args.stage} of {RECIPE.name}: batch {stage.batch_size}, micro-batch {stage.micro_batch_size}, "
          f"{recipe.stage_runtime(stage).precision}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.blocks} blocks of {args.steps_per_block} steps, median of the blocks")
    baseline = None
    for name, times in seconds.items():
        median = sorted(times)[len(times) // 2]
        baseline = baseline or median
        print(f"| {name} | {median * 1e3:.0f} ms/step | {baseline / median:.2f}x |")


if __name__ == "__main__":
    main()
