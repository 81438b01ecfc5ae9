"""The `openjanus` command line: thin wrappers over JanusPipeline, weights and (later) train/eval/serve."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .cli_errors import clean_errors, fail
from .cli_options import CompileOption, DeviceOption, DtypeOption, JacobiOption, load_pipeline

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="DeepSeek Janus / Janus-Pro: chat about images, generate images, convert checkpoints.")

ModelOption = Annotated[Path | None, typer.Option("--model", "-m", help="Checkpoint directory "
                                                     "(official, transformers or openjanus layout); "
                                                     "default: the shipped model.")]
QuantizationOption = Annotated[str | None, typer.Option(help="int8: weight-only int8 LLM and heads (about half "
                                                             "the weight bytes, faster on CPU); default none.")]


@app.command()
@clean_errors
def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    model: ModelOption = None,
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="Images per prompt.")] = 1,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", "--cfg-weight",
                                                  help="Classifier-free guidance weight.")] = 5.0,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 1.0,
    top_k: Annotated[int | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for exact reproducibility.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("out"),
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    quantization: QuantizationOption = None,
    jacobi_window: JacobiOption = 0,
    compile: CompileOption = False,
) -> None:
    """Generate images from text prompts; writes PNGs named 000.png, 001.png, ... (prompt-major)."""
    pipe = load_pipeline(model, device, dtype, quantization, compile)
    images = pipe.generate_images(prompt, num_images_per_prompt=num_images, guidance_scale=guidance_scale,
                                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                  jacobi_window=jacobi_window)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out / f"{i:03d}.png"
        image.save(path)
        typer.echo(str(path))


@app.command()
@clean_errors
def ask(
    image: Annotated[list[Path], typer.Argument(help="Image file(s), then the question as the last argument.")],
    model: ModelOption = None,
    max_new_tokens: Annotated[int, typer.Option()] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float | None, typer.Option()] = None,
    top_k: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    quantization: QuantizationOption = None,
    compile: CompileOption = False,
) -> None:
    """Answer a question about one or more images: openjanus ask IMAGE [IMAGE...] QUESTION."""
    if len(image) < 2:
        fail("give at least one image and a question: openjanus ask IMAGE QUESTION")
    *images, question = image
    pipe = load_pipeline(model, device, dtype, quantization, compile)
    pieces = pipe.chat([{"role": "user", "content": str(question), "images": [str(p) for p in images]}],
                       stream=True, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       top_k=top_k, seed=seed)
    for piece in pieces:
        typer.echo(piece, nl=False)
    typer.echo()


@app.command()
@clean_errors
def chat(
    model: ModelOption = None,
    max_new_tokens: Annotated[int, typer.Option()] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float | None, typer.Option()] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    quantization: QuantizationOption = None,
    compile: CompileOption = False,
) -> None:
    """Interactive multi-turn chat. `/image PATH` attaches an image to the next message; `/reset`, `/exit`."""
    pipe = load_pipeline(model, device, dtype, quantization, compile)
    history: list[dict] = []
    pending: list[str] = []
    typer.echo("openjanus chat: /image PATH attaches an image, /reset clears history, /exit quits.")
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("you> "), None):
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history, pending = [], []
            typer.echo("(history cleared)")
            continue
        if line.startswith("/image "):
            path = line[len("/image "):].strip()
            from .processing.image import load_image

            try:
                load_image(path)
            except ValueError as exc:
                typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
                continue
            pending.append(path)
            typer.echo(f"(attached {path})")
            continue
        message = {"role": "user", "content": line, "images": pending}
        try:
            reply = ""
            typer.echo("janus> ", nl=False)
            for piece in pipe.chat(history + [message], stream=True, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p):
                reply += piece
                typer.echo(piece, nl=False)
            typer.echo()
        except ValueError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            continue
        history += [message, {"role": "assistant", "content": reply.strip() or "..."}]
        pending = []


@app.command()
@clean_errors
def convert(
    src: Annotated[Path, typer.Argument(help="Checkpoint directory in any supported layout.")],
    dst: Annotated[Path, typer.Argument(help="Output directory.")],
    to: Annotated[str, typer.Option("--to", help="openjanus, official or hf")] = "openjanus",
    dtype: DtypeOption = None,
    keep_float32: Annotated[list[str] | None, typer.Option(
        "--keep-float32", help="Keep this component in float32 whatever --dtype says (repeatable), e.g. "
                               "gen_vision_model: a VQ cast to bf16 encodes images to different codes.")] = None,
) -> None:
    """Convert a checkpoint between the openjanus, official and transformers layouts (safetensors)."""
    import torch

    from .processing.tokenizer import JanusTokenizer
    from .weights import LAYOUTS, load_checkpoint, resolve_dtype, save_checkpoint

    if to not in LAYOUTS:
        fail(f"--to must be one of {', '.join(LAYOUTS)}")
    if dst.resolve() == src.resolve():
        fail("destination must differ from the source")
    checkpoint = load_checkpoint(src, device="cpu")
    components, keep = dict(checkpoint.model.named_children()), set(keep_float32 or ())
    if unknown := sorted(keep - set(components)):
        fail(f"--keep-float32: unknown component {', '.join(unknown)}; the model has {', '.join(components)}")
    target = resolve_dtype(dtype)
    for name, component in components.items():
        if name in keep or target:
            component.to(torch.float32 if name in keep else target)
    tokenizer = JanusTokenizer.from_file(src / "tokenizer.json")
    save_checkpoint(checkpoint.model, dst, to, tokenizer_file=src / "tokenizer.json",
                    image_token_id=tokenizer.image_id)
    typer.echo(f"wrote {dst} ({to} layout, from {checkpoint.layout})")


@app.command()
@clean_errors
def info(
    model: ModelOption = None,
    preset: Annotated[str | None, typer.Option(help="Describe a named preset instead of a checkpoint.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Config, parameter counts by component and a memory estimate, without loading the weights."""
    import torch

    from .config import get_preset
    from .model import JanusModel
    from .pipeline import default_model_dir
    from .weights import read_config

    if preset:
        config, layout, where = get_preset(preset), "preset", preset
    else:
        path = model or default_model_dir()
        (config, layout), where = read_config(path), str(path)
    with torch.device("meta"):
        module = JanusModel(config)
    counts = {name: sum(t.numel() for t in child.state_dict().values()) for name, child in module.named_children()}
    total = sum(counts.values())
    kv_per_token = 2 * config.llm.num_layers * config.llm.num_kv_heads * config.llm.head_dim
    report = {
        "model": where, "layout": layout, "config": config.to_dict(), "parameters": counts, "total": total,
        "memory_gb": {"bfloat16": total * 2 / 1e9, "float32": total * 4 / 1e9},
        "kv_cache_mb_per_image_bf16": kv_per_token * 2 * 2 * (config.num_image_tokens + 64) / 1e6,
        "image_size": config.image_size, "image_tokens": config.num_image_tokens,
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"model: {where} ({layout} layout, chat format {config.sft_format})")
    llm = config.llm
    typer.echo(f"LLM: {llm.num_layers} layers, width {llm.hidden_size}, {llm.num_heads} heads "
               f"({llm.num_kv_heads} KV), vocab {llm.vocab_size}, context {llm.context_length}")
    typer.echo(f"images: {config.image_size}px, {config.vision.num_patches} understanding tokens, "
               f"{config.num_image_tokens} generated tokens, codebook {config.vq.codebook_size}")
    for name, count in counts.items():
        typer.echo(f"  {name:18s} {count:>15,d}")
    typer.echo(f"  {'total':18s} {total:>15,d}")
    typer.echo(f"weights: {report['memory_gb']['bfloat16']:.2f} GB in bf16, {report['memory_gb']['float32']:.2f} GB "
               f"in fp32; KV cache ~{report['kv_cache_mb_per_image_bf16']:.0f} MB per guided image in bf16")


@app.command()
@clean_errors
def bench(
    size: Annotated[str, typer.Option(help="tiny, janus-pro-1b, janus-1.3b or janus-pro-7b")] = "tiny",
    dtype: Annotated[str, typer.Option(help="bfloat16 or float32")] = "bfloat16",
    repeats: Annotated[int, typer.Option()] = 3,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    quantization: Annotated[str, typer.Option(help="Also time openjanus with these weights: int8 (default) "
                                                   "or none (skip those rows).")] = "int8",
    compile: Annotated[bool, typer.Option("--compile", help="Also time openjanus with its compiled decode "
                                                           "steps.")] = False,
) -> None:
    """Speed and memory against the transformers port on identical random weights (needs transformers)."""
    from .bench import format_table, run
    from .model.quant import check_quantization

    extra = check_quantization(quantization)

    try:
        import transformers  # noqa: F401
    except ImportError:
        fail("the benchmark compares with transformers: pip install transformers")
    typer.echo(format_table(run(size, dtype, repeats=repeats, out=out,
                             quantizations=(extra,) if extra else (), compile=compile)))


def _register_subcommands() -> None:
    from .eval.cli import register as register_eval
    from .serve.cli import register as register_serve
    from .train.cli import register as register_train

    register_train(app)
    register_eval(app)
    register_serve(app)


_register_subcommands()

if __name__ == "__main__":
    app()
