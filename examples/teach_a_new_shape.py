"""Teach a trained ShapesWorld model a shape it has never seen, from files in the user formats, with LoRA on the CPU.

    python examples/teach_a_new_shape.py --model DIR --out DIR [--examples 400] [--steps 1000]

The new concept is the `rectangle` (axis-aligned, three times as wide as high; see
`openjanus.worlds.shapes.EXTRA_SHAPES`): neither the model's images nor its text ever showed one.
The script

1. writes a dataset the way a user would bring one: a LLaVA-style JSON array of questions about
   images (`OUT/data/understanding/llava.json` + `images/`) and an image folder with a
   `metadata.jsonl` of prompts (`OUT/data/generation/`). Half the records are about rectangles,
   half are ordinary ShapesWorld scenes, so that the old skills are rehearsed;
2. writes a recipe (`OUT/recipe.yaml`) that starts from `--model`: LoRA adapters on the LLM
   (`--also-train vision_model` trains the understanding encoder in full besides);
3. measures the model before: held-out rectangle questions and prompts (scored by the reference
   checker extended with the rectangle), and the usual shapes-vqa and shapes-geneval on a fixed
   held-out sample;
4. trains the recipe (`openjanus.train.runner.run`, the code behind `openjanus train`) into
   `OUT/run/` and measures the merged output the same way;
5. prints a before/after table and writes it to `OUT/report.json`.

Everything is seeded: the same arguments give the same data, the same training and the same
evaluation samples. Why a shape and not a colour: the VQ image tokenizer stays frozen in Janus
training, and it reconstructs a colour it never saw as one of the six it knows, so no LoRA on the
LLM can make the model draw a new colour (`before.new_color` in the report measures this for
teal); a new shape is made of edges and fills the VQ already reconstructs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from openjanus.worlds import shapes as world

NEW_SHAPE = "rectangle"
VOCAB = world.extend_vocabulary(shapes=[NEW_SHAPE])
# Questions that can name a shape (count_all cannot).
NEW_FAMILIES = ("count_shape", "color_of", "shape_of", "exists", "relation")
# Seeds of the training data and of the held-out evaluation items; they never share a stream.
DATA_SEED = world.SPLIT_SEEDS["train"]
EVAL_SEED = world.SPLIT_SEEDS["test"] + 17
STAGE = "teach"
NEW_COLOR = {"teal": (0, 150, 150)}  # only measured, to show why the demo teaches a shape


# ---------------------------------------------------------------------------------------------- data


def mentions_new_shape(*texts: str) -> bool:
    """Whether any of the texts names the new shape."""
    return any(NEW_SHAPE in text for text in texts)


def new_shape_question(rng: np.random.Generator, family: str | None = None) -> tuple[world.Scene, world.Question]:
    """A scene holding at least one rectangle and a question (of `family`, or any) that names a rectangle."""
    while True:
        scene = world.sample_scene(rng, world.MIN_SIZE, vocab=VOCAB)
        if not any(o.shape == NEW_SHAPE for o in scene.objects):
            continue
        wanted = family or NEW_FAMILIES[int(rng.integers(len(NEW_FAMILIES)))]
        question = world.sample_question(rng, scene, wanted, vocab=VOCAB)
        if question is not None and mentions_new_shape(question.text, question.answer):
            return scene, question


def old_question(rng: np.random.Generator) -> tuple[world.Scene, world.Question]:
    """An ordinary ShapesWorld scene and question (any family), for rehearsal."""
    family = world.QUESTION_FAMILIES[int(rng.integers(len(world.QUESTION_FAMILIES)))]
    while True:
        scene = world.sample_scene(rng, world.MIN_SIZE)
        question = world.sample_question(rng, scene, family)
        if question is not None:
            return scene, question


def new_shape_prompt(rng: np.random.Generator, task: str | None = None) -> world.GenPrompt:
    """A shapes-GenEval prompt (of `task`, or any) that names a rectangle."""
    while True:
        chosen = task or world.TASKS[int(rng.integers(len(world.TASKS)))]
        prompt = world.sample_prompt(rng, chosen, vocab=VOCAB)
        if NEW_SHAPE in prompt.spec["shapes"]:
            return prompt


def more_questions(rng: np.random.Generator, scene: world.Scene, count: int, vocab: world.Vocabulary,
                   asked: set[str]) -> list[world.Question]:
    """Up to `count` further questions about a scene, of any family, none asked before."""
    questions = []
    for _ in range(8 * count):
        if len(questions) == count:
            break
        question = world.sample_question(rng, scene, vocab=vocab)
        if question is not None and question.text not in asked:
            asked.add(question.text)
            questions.append(question)
    return questions


def contrast_question(rng: np.random.Generator, scene: world.Scene) -> world.Question | None:
    """"What shape is the {color} object?" about an object of the scene that is not the new shape, if any."""
    for _ in range(8):
        question = world.sample_question(rng, scene, "shape_of", vocab=VOCAB)
        if question is None:
            return None
        if question.answer != NEW_SHAPE:
            return question
    return None


def write_dataset(root: str | Path, examples: int = 400, new_fraction: float = 0.5, seed: int = 0,
                  image_size: int = world.MIN_SIZE, turns: int = 3) -> dict[str, Path]:
    """Write `examples` understanding records and `examples` text-to-image pairs under `root`, in the user formats.

    Returns {"understanding": llava.json, "generation": metadata.jsonl}. A share `new_fraction`
    of each is about the new shape: a scene with a rectangle and questions about it, one of which
    names the rectangle and one of which asks the shape of another object when there is one (so
    that the rectangle is told apart from the others), or a prompt that names it. The rest are
    ordinary ShapesWorld scenes (rehearsal). Conversations have up to `turns` question-answer
    turns about their image, in a random order.
    """
    root = Path(root)
    understanding_dir, generation_dir = root / "understanding", root / "generation"
    (understanding_dir / "images").mkdir(parents=True, exist_ok=True)
    generation_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(examples):
        rng = np.random.default_rng([DATA_SEED, seed, 1, index])
        is_new = rng.random() < new_fraction
        scene, question = new_shape_question(rng) if is_new else old_question(rng)
        questions = [question]
        contrast = contrast_question(rng, scene) if is_new else None
        if contrast is not None and contrast.text != question.text:
            questions.append(contrast)
        questions += more_questions(rng, scene, turns - len(questions), VOCAB if is_new else world.SPEC_VOCABULARY,
                                    {q.text for q in questions})
        # In a random order: were the rectangle question always first, the model would learn that a first
        # "What shape ...?" is about a rectangle.
        questions = [questions[k] for k in rng.permutation(len(questions))]
        name = f"images/{index:05d}.png"
        world.render(scene, image_size).save(understanding_dir / name)
        conversation = []
        for turn, asked in enumerate(questions):
            conversation += [{"from": "human", "value": ("<image>\n" if turn == 0 else "") + asked.text},
                             {"from": "gpt", "value": asked.answer}]
        records.append({"image": name, "conversations": conversation})
    llava = understanding_dir / "llava.json"
    llava.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")

    lines = []
    for index in range(examples):
        rng = np.random.default_rng([DATA_SEED, seed, 2, index])
        is_new = rng.random() < new_fraction
        if is_new:
            prompt = new_shape_prompt(rng)
            scene = world.scene_for_prompt(rng, prompt, world.MIN_SIZE, vocab=VOCAB)
        else:
            prompt = world.sample_prompt(rng, world.TASKS[int(rng.integers(len(world.TASKS)))])
            scene = world.scene_for_prompt(rng, prompt, world.MIN_SIZE)
        name = f"{index:05d}.png"
        world.render(scene, image_size).save(generation_dir / name)
        lines.append(json.dumps({"file_name": name, "text": prompt.text}))
    metadata = generation_dir / "metadata.jsonl"
    metadata.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"understanding": llava, "generation": metadata}


def write_recipe(path: str | Path, model_dir: str | Path, files: dict[str, Path], steps: int = 1000,
                 batch_size: int = 16, lr: float = 3.0e-4, rank: int = 16, also_train: tuple[str, ...] = (),
                 runtime: dict[str, Any] | None = None) -> Path:
    """A one-stage LoRA recipe on the user files, starting from `model_dir` (with its tokenizer).

    LoRA adapters on the LLM's linear layers; `also_train` names components trained in full besides.
    """
    model_dir = Path(model_dir).resolve()
    stage = {
        "name": STAGE, "task": "janus", "steps": steps, "batch_size": batch_size,
        "model": {"init": str(model_dir), "train": ["language_model", *also_train],
                  "lora": {"r": rank, "alpha": 2.0 * rank, "dropout": 0.0,
                           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"]}},
        "data": {"ratios": {"understanding": 1, "generation": 1},
                 "files": {kind: str(Path(file).resolve()) for kind, file in files.items()},
                 "eval_batches": 0, "caption_drop": 0.1},
        # An answer is a token or two, an image 64 codes: weigh the answers up, as the base recipe does.
        "loss": {"kind_weights": {"understanding": 4.0}},
        "optim": {"lr": lr, "warmup_steps": max(1, steps // 10), "schedule": "cosine"},
    }
    recipe = {"name": "teach-a-new-shape", "tokenizer": {"file": str(model_dir / "tokenizer.json")},
              "runtime": {"progress": False, "log_every": 25, "checkpoint_every_steps": 10_000,
                          **(runtime or {})},
              "stages": [stage]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by examples/teach_a_new_shape.py; train it with `openjanus train` on its own.\n"
                    + yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- evaluation


def new_shape_questions(n_per_family: int, seed: int = EVAL_SEED) -> list[tuple[world.Scene, world.Question]]:
    """Held-out (scene, question) pairs that name the new shape, `n_per_family` of every family that can."""
    pairs = []
    for index, family in enumerate(NEW_FAMILIES):
        rng = np.random.default_rng([seed, 1, index])
        pairs += [new_shape_question(rng, family) for _ in range(n_per_family)]
    return pairs


def new_shape_prompts(n_per_task: int, seed: int = EVAL_SEED) -> list[world.GenPrompt]:
    """Held-out shapes-GenEval prompts that name the new shape, `n_per_task` of every task."""
    prompts = []
    for index, task in enumerate(world.TASKS):
        rng = np.random.default_rng([seed, 2, index])
        prompts += [new_shape_prompt(rng, task) for _ in range(n_per_task)]
    return prompts


def evaluate_new_understanding(pipe, n_per_family: int, batch_size: int = 16) -> dict:
    """Greedy answers to held-out rectangle questions: accuracy per family and overall (mean of families)."""
    from openjanus.eval.common import chunks, mean_scores

    pairs = new_shape_questions(n_per_family)
    answers: list[str] = []
    for chunk in chunks(len(pairs), batch_size):
        conversations = [[{"role": "user", "content": pairs[i][1].text,
                           "images": [world.render(pairs[i][0])]}] for i in chunk]
        answers += pipe.answer(conversations, max_new_tokens=8, temperature=0.0)
    correct = [world.score_answer(a, q.answer) for a, (_, q) in zip(answers, pairs)]
    scores = mean_scores([q.family for _, q in pairs], correct, NEW_FAMILIES)
    examples = [{"question": q.text, "expected": q.answer, "answer": a}
                for a, (_, q) in list(zip(answers, pairs))[::n_per_family]]  # the first of every family
    return {"overall": scores["overall"], "scores": scores, "questions": len(pairs), "examples": examples}


def evaluate_new_generation(pipe, n_per_task: int, images_per_prompt: int = 1, batch_size: int = 12,
                            seed: int = 0, guidance_scale: float = 5.0) -> dict:
    """Images for held-out rectangle prompts, scored by the checker that knows rectangles; with both ceilings."""
    from openjanus.eval.common import generate_batches, mean_scores, vq_round_trip

    prompts = new_shape_prompts(n_per_task)
    tasks, verdicts = [], []
    for chunk, images in generate_batches(pipe, [p.text for p in prompts], images_per_prompt, batch_size, seed,
                                          guidance_scale, 1.0, progress=False):
        for index, row in zip(chunk, images):
            tasks += [prompts[index].task] * len(row)
            verdicts += [world.score_image(image, prompts[index], VOCAB) for image in row]
    renders = [world.render(world.scene_for_prompt(np.random.default_rng([EVAL_SEED, 3, i]), p, world.MIN_SIZE,
                                                   VOCAB))
               for i, p in enumerate(prompts)]
    round_trips = vq_round_trip(pipe, renders, batch_size, progress=False)
    scores = mean_scores(tasks, verdicts, world.TASKS)
    return {"overall": scores["overall"], "scores": scores, "images": len(verdicts),
            "oracle_ceiling": world.score_images(zip(renders, prompts), VOCAB)["overall"],
            "tokenizer_ceiling": world.score_images(zip(round_trips, prompts), VOCAB)["overall"]}


def new_color_ceiling(pipe, count: int = 30, batch_size: int = 12) -> dict:
    """Why not a new colour: the checker on teal renders, and on those renders after the model's VQ round trip."""
    from openjanus.eval.common import vq_round_trip

    (name, rgb), = NEW_COLOR.items()
    vocab = world.extend_vocabulary(colors=NEW_COLOR)
    rng = np.random.default_rng([EVAL_SEED, 4])
    prompts = []
    while len(prompts) < count:
        prompt = world.sample_prompt(rng, "colors", vocab=vocab)
        if prompt.spec["colors"] == (name,):
            prompts.append(prompt)
    renders = [world.render(world.scene_for_prompt(rng, p, world.MIN_SIZE, vocab)) for p in prompts]
    round_trips = vq_round_trip(pipe, renders, batch_size, progress=False)
    return {"color": name, "rgb": list(rgb), "prompts": count,
            "oracle": world.score_images(zip(renders, prompts), vocab)["overall"],
            "tokenizer_ceiling": world.score_images(zip(round_trips, prompts), vocab)["overall"]}


def evaluate(model_dir: str | Path, n_new: int = 30, n_old: int = 50, seed: int = 0, color_check: bool = False,
             echo: Callable[[str], None] = print) -> dict:
    """Every measurement of the demo on one checkpoint (float32, CPU)."""
    from openjanus import JanusPipeline
    from openjanus.eval.shapes_geneval import shapes_geneval
    from openjanus.eval.shapes_vqa import shapes_vqa

    started = time.perf_counter()
    pipe = JanusPipeline.from_pretrained(model_dir, device="cpu", dtype="float32")
    report = {"model": str(model_dir)}
    if color_check:
        report["new_color"] = new_color_ceiling(pipe)
        echo(f"  teal (not taught): checker {report['new_color']['oracle']:.3f} on renders, "
             f"{report['new_color']['tokenizer_ceiling']:.3f} after the VQ round trip")
    report["new_understanding"] = evaluate_new_understanding(pipe, n_new)
    echo(f"  rectangle questions: {report['new_understanding']['overall']:.3f}")
    report["new_generation"] = evaluate_new_generation(pipe, n_new, seed=seed)
    echo(f"  rectangle prompts: {report['new_generation']['overall']:.3f}")
    vqa = shapes_vqa(pipe, n_per_family=n_old, progress=False)
    report["shapes_vqa"] = {"overall": vqa["overall"], "scores": vqa["scores"],
                            "questions": vqa["settings"]["questions"]}
    echo(f"  shapes-vqa: {vqa['overall']:.3f}")
    geneval = shapes_geneval(pipe, n_per_task=n_old, images_per_prompt=1, seed=seed, progress=False)
    report["shapes_geneval"] = {"overall": geneval["overall"], "scores": geneval["scores"],
                                "images": geneval["settings"]["images"],
                                "tokenizer_ceiling": geneval["tokenizer_ceiling"]["overall"]}
    echo(f"  shapes-geneval: {geneval['overall']:.3f}")
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


ROWS = [
    ("rectangle questions (new)", ("new_understanding", "overall")),
    *[(f"  {family}", ("new_understanding", "scores", family)) for family in NEW_FAMILIES],
    ("rectangle prompts (new)", ("new_generation", "overall")),
    *[(f"  {task}", ("new_generation", "scores", task)) for task in world.TASKS],
    ("  tokenizer ceiling", ("new_generation", "tokenizer_ceiling")),
    ("shapes-vqa overall (old)", ("shapes_vqa", "overall")),
    *[(f"  {family}", ("shapes_vqa", "scores", family)) for family in world.QUESTION_FAMILIES],
    ("shapes-geneval overall (old)", ("shapes_geneval", "overall")),
    *[(f"  {task}", ("shapes_geneval", "scores", task)) for task in world.TASKS],
]


def table(before: dict, after: dict) -> str:
    """The before/after table, in Markdown."""

    def get(report: dict, keys: tuple) -> float:
        for key in keys:
            report = report[key]
        return report

    lines = ["| measure | before | after | change |", "| --- | ---: | ---: | ---: |"]
    for label, keys in ROWS:
        old, new = get(before, keys), get(after, keys)
        name = label.strip() if not label.startswith("  ") else "&nbsp;&nbsp;" + label.strip()
        if not label.startswith("  "):
            name = f"**{name}**"
        lines.append(f"| {name} | {old:.3f} | {new:.3f} | {new - old:+.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="checkpoint directory to teach (with tokenizer.json)")
    parser.add_argument("--out", required=True, type=Path, help="where the data, recipe, run and report go")
    parser.add_argument("--examples", type=int, default=400, help="records per data file (understanding, generation)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3.0e-4)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--also-train", nargs="*", default=[], metavar="COMPONENT",
                        help="components trained in full besides the LoRA adapters, e.g. vision_model (default: "
                             "none; training the encoder too was measured to lose more of the old shapes-vqa)")
    parser.add_argument("--eval-new", type=int, default=30, help="held-out rectangle items per question family / task")
    parser.add_argument("--eval-old", type=int, default=100, help="shapes-vqa questions per family, shapes-geneval "
                                                                  "prompts per task")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                        help="training precision (bf16: autocast, fp32 master weights)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and measuring; 1 is "
                                                               "fastest on a busy machine (0 = torch's default)")
    args = parser.parse_args(argv)

    import torch

    from openjanus.train.runner import run

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"[1/5] writing {args.examples} understanding records and {args.examples} image-text pairs to {out / 'data'}")
    files = write_dataset(out / "data", args.examples)
    recipe = write_recipe(out / "recipe.yaml", args.model, files, args.steps, args.batch_size, args.lr, args.rank,
                          tuple(args.also_train), runtime={"precision": args.precision, "threads": args.threads})
    print(f"[2/5] recipe {recipe}")
    print(f"[3/5] measuring {args.model} before")
    before = evaluate(args.model, args.eval_new, args.eval_old, color_check=True)
    print(f"[4/5] training ({args.steps} LoRA steps, batch {args.batch_size})")
    tick = time.perf_counter()
    output = run(recipe, run_dir=out / "run", resume=False)
    train_s = time.perf_counter() - tick
    print(f"[5/5] measuring {output} after")
    after = evaluate(output, args.eval_new, args.eval_old)
    report = {"settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "new_shape": NEW_SHAPE, "torch_threads": torch.get_num_threads()},
              "data": {kind: str(path) for kind, path in files.items()}, "recipe": str(recipe), "output": str(output),
              "before": before, "after": after, "train_seconds": round(train_s, 1),
              "total_seconds": round(time.perf_counter() - started, 1), "table": table(before, after)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print()
    print(report["table"])
    print(f"\ntraining {train_s / 60:.1f} min, total {report['total_seconds'] / 60:.1f} min; report in "
          f"{out / 'report.json'}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
