"""`openjanus eval ...`: shapes-GenEval, shapes-VQA and GenEval exports from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..cli_errors import clean_errors
from ..cli_options import CompileOption, DeviceOption, DtypeOption, JacobiOption, load_pipeline

eval_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Exact offline evaluations (shapes-GenEval, shapes-VQA) and GenEval exports.")

ModelOption = Annotated[Path | None, typer.Option("--model", "-m", help="Checkpoint directory; default: the "
                                                     "shipped model.")]
QuantizationOption = Annotated[str | None, typer.Option(help="int8: score the weight-only int8 model.")]
OutOption = Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the JSON report and sample grid.")]
SeedOption = Annotated[int, typer.Option(help="Sampling seed; same seed and batch size, same images.")]
ImagesOption = Annotated[int, typer.Option("--images-per-prompt", help="Images per prompt (GenEval: 4).")]
GuidanceOption = Annotated[float, typer.Option("--guidance-scale", help="Classifier-free guidance weight.")]
TemperatureOption = Annotated[float, typer.Option(help="Sampling temperature for image tokens; 0 = greedy.")]
BatchOption = Annotated[int, typer.Option("--batch-size", help="Prompts (or questions) per forward batch.")]


def register(app: typer.Typer) -> None:
    """Add the `eval` command group to the main CLI."""
    app.add_typer(eval_app, name="eval")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[k])) for row in [header, *rows]) for k in range(len(header))]
    lines = [header, *rows]
    return "\n".join("  ".join(str(cell).ljust(w) if k == 0 else str(cell).rjust(w)
                               for k, (cell, w) in enumerate(zip(line, widths))) for line in lines)


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@eval_app.command("shapes-geneval")
@clean_errors
def shapes_geneval_command(
    model: ModelOption = None,
    n_per_task: Annotated[int, typer.Option("--n-per-task", help="Held-out prompts per task.")] = 100,
    images_per_prompt: ImagesOption = 4,
    guidance_scale: GuidanceOption = 5.0,
    temperature: TemperatureOption = 1.0,
    seed: SeedOption = 0,
    batch_size: BatchOption = 8,
    out: OutOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    quantization: QuantizationOption = None,
    jacobi_window: JacobiOption = 0,
    compile: CompileOption = False,
) -> None:
    """Text-to-image on held-out ShapesWorld prompts, scored exactly, with oracle and tokenizer ceilings."""
    from .shapes_geneval import shapes_geneval

    pipe = load_pipeline(model, device, dtype, quantization, compile)
    report = shapes_geneval(pipe, n_per_task=n_per_task, images_per_prompt=images_per_prompt,
                            guidance_scale=guidance_scale, temperature=temperature, seed=seed,
                            batch_size=batch_size, out_dir=out, jacobi_window=jacobi_window)
    scores, oracle, tokenizer = report["scores"], report["oracle_ceiling"], report["tokenizer_ceiling"]
    rows = [[name, _score(scores.get(name)), _score(oracle.get(name)), _score(tokenizer.get(name))]
            for name in [*scores]]
    typer.echo(_table(["task", "model", "oracle", "tokenizer"], rows))
    _confusions(report["drawn"], "largest object drawn per named word")
    passes = report["timing"]["forward_passes_per_batch"]
    _footer(report, f"{report['settings']['images']} images"
                    + (f" ({passes} forward passes per batch of {batch_size} prompts)" if passes else ""))


@eval_app.command("shapes-vqa")
@clean_errors
def shapes_vqa_command(
    model: ModelOption = None,
    n_per_family: Annotated[int, typer.Option("--n-per-family", help="Held-out questions per family.")] = 100,
    batch_size: BatchOption = 16,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Answer length cap.")] = 8,
    out: OutOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    quantization: QuantizationOption = None,
    compile: CompileOption = False,
) -> None:
    """Greedy one-word answers to held-out ShapesWorld questions: accuracy per family and yes-ratios."""
    from .shapes_vqa import shapes_vqa

    pipe = load_pipeline(model, device, dtype, quantization, compile)
    report = shapes_vqa(pipe, n_per_family=n_per_family, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        out_dir=out)
    yes, expected = report["yes_ratio"], report["expected_yes_ratio"]
    rows = [[name, _score(value), _score(yes.get(name)) if name != "overall" else "-",
             _score(expected.get(name)) if name != "overall" else "-"] for name, value in report["scores"].items()]
    typer.echo(_table(["family", "accuracy", "yes", "yes expected"], rows))
    _confusions(report["answered"], "answers per expected answer")
    _footer(report, f"{report['settings']['questions']} questions")


@eval_app.command("geneval-export")
@clean_errors
def geneval_export_command(
    prompts: Annotated[Path, typer.Option("--prompts", help="GenEval metadata JSONL (e.g. "
                                                            "evaluation_metadata.jsonl).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New or empty folder for the images.")],
    model: ModelOption = None,
    images_per_prompt: ImagesOption = 4,
    guidance_scale: GuidanceOption = 5.0,
    temperature: TemperatureOption = 1.0,
    seed: SeedOption = 0,
    batch_size: BatchOption = 8,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    quantization: QuantizationOption = None,
    compile: CompileOption = False,
) -> None:
    """Generate images for GenEval prompts in the folder layout the official evaluate_images.py reads."""
    from .geneval_export import export_geneval, load_metadata

    metadata = load_metadata(prompts)  # fail on a bad file before loading the model
    pipe = load_pipeline(model, device, dtype, quantization, compile)
    summary = export_geneval(pipe, metadata, out, images_per_prompt=images_per_prompt,
                             guidance_scale=guidance_scale, temperature=temperature, seed=seed,
                             batch_size=batch_size)
    typer.echo(f"wrote {summary['images']} images for {summary['prompts']} prompts to {summary['out_dir']} "
               f"in {summary['timing']['total_s']:.1f} s")


@eval_app.command("shapes-metadata")
@clean_errors
def shapes_metadata_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write.")],
    n_per_task: Annotated[int, typer.Option("--n-per-task", help="Held-out prompts per task.")] = 100,
) -> None:
    """Write the held-out shapes-GenEval prompts as GenEval metadata JSONL, for geneval-export."""
    from .geneval_export import shapes_geneval_metadata, write_metadata

    metadata = shapes_geneval_metadata(n_per_task)
    typer.echo(f"wrote {len(metadata)} prompts to {write_metadata(out, metadata)}")


def _confusions(tallies: dict[str, dict[str, dict[str, int]]], what: str) -> None:
    """Print {group: {expected: {seen: count}}}, most frequent first ("" shows as (empty))."""
    for group, rows in tallies.items():
        typer.echo(f"{group}, {what}:")
        for expected, seen in rows.items():
            ordered = sorted(seen.items(), key=lambda kv: -kv[1])
            typer.echo(f"  {expected:8s} " + ", ".join(f"{k or '(empty)'} {v}" for k, v in ordered))


def _footer(report: dict, what: str) -> None:
    typer.echo(f"{what} in {report['timing']['total_s']:.1f} s")
    if "files" in report:
        typer.echo(f"report: {report['files']['report']}\nsamples: {report['files']['grid']}")
