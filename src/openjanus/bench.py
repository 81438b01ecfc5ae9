"""Speed and memory of openjanus against the transformers port on identical random weights.

Both systems load the same checkpoint (written once in the transformers layout) and are timed
interleaved, in one run, with warm-up and repeats; results are ratios, never absolute claims.
Per-step times are differences between two run lengths, so prefill and set-up cancel out.
With quantizations (int8 by default), openjanus is also timed on the same weights quantized, and
with `compile`, with its compiled decode steps.
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from itertools import chain
from pathlib import Path

import torch

from .config import JanusConfig, get_preset
from .generation import compile_image_step, compile_text_step, generate_image_tokens, stream_text
from .model import JanusModel
from .model.kernels import pack_linears
from .model.quant import check_quantization, quantize
from .weights import load_checkpoint, save_checkpoint

CACHE = Path.home() / ".cache" / "openjanus" / "bench"
# Special token ids of the benchmark's prompts (random weights: any ids below the prompt range of 10+).
BOS, BOI, PAD = 1, 2, 3


def tiny_config() -> JanusConfig:
    """A small model with the official structure, for smoke runs."""
    config = get_preset("janus-pro-1b")
    config.llm.hidden_size, config.llm.intermediate_size, config.llm.num_layers = 256, 688, 4
    config.llm.num_heads = config.llm.num_kv_heads = 4
    config.llm.vocab_size = 1024
    config.vision.width, config.vision.layers, config.vision.heads, config.vision.image_size = 128, 2, 2, 128
    config.vq.ch, config.vq.codebook_size = 32, 1024
    return config.validate()


def _synchronized(device: torch.device, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def read_bandwidth(gigabytes: float = 1.0, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """Best-of read bandwidth in GB/s from summing a large float32 tensor on `device`."""
    device = torch.device(device)
    x = torch.ones(int(gigabytes * 1e9 / 4), device=device)
    best = min(_timed(_synchronized(device, x.sum)) for _ in range(repeats + 1))
    return x.numel() * 4 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    """Best time of `repeats` calls after one warm-up call."""
    fn()
    return min(_timed(fn) for _ in range(repeats))


def _per_step(run: Callable[[int], object], short: int, long: int, repeats: int) -> float:
    """Seconds per step from the best times of a short and a long run."""
    run(short)  # warm-up
    best_short = min(_timed(lambda: run(short)) for _ in range(repeats))
    best_long = min(_timed(lambda: run(long)) for _ in range(repeats))
    return max(best_long - best_short, 1e-9) / (long - short)


def _checkpoint(name: str, config: JanusConfig, dtype: torch.dtype) -> Path:
    """Random weights in the transformers layout, written once and reused."""
    path = CACHE / f"{name}-{str(dtype).removeprefix('torch.')}"
    if (path / "config.json").exists():
        return path
    with torch.device("meta"):
        model = JanusModel(config)
    model = model.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    save_checkpoint(model, path, "hf", image_token_id=config.llm.vocab_size - 1)
    return path


def _step_bytes(model: JanusModel, rows: int, context: int, text: bool = False) -> int:
    """Bytes one decode step must read: LLM layers, the head (and adaptor), KV cache.

    An image step (guided: 2 rows per image) reads the image head and the image-token adaptor,
    a text step (`text`) the text head.
    """
    heads = [model.language_model.lm_head] if text else [model.gen_head, model.gen_aligner]
    parts = [model.backbone.layers, model.backbone.norm, *heads]
    weights = sum(t.numel() * t.element_size() for part in parts for t in chain(part.parameters(), part.buffers()))
    llm = model.config.llm
    element = model.backbone.embed_tokens.weight.element_size()
    kv = 2 * llm.num_layers * rows * llm.num_kv_heads * llm.head_dim * context * element
    return weights + kv


def _weights_gb(model: JanusModel) -> float:
    # parameters() and buffers() skip repeats (tied weights) and include packed layers' buffers.
    return sum(t.numel() * t.element_size() for t in chain(model.parameters(), model.buffers())) / 1e9


_LOAD_PEAK_SCRIPT = """
import json, resource, sys, torch
from openjanus.bench import load_for_inference
model = load_for_inference(sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9))
"""


def load_for_inference(path: str | Path, dtype: torch.dtype, quantization: str | None = None) -> JanusModel:
    """A checkpoint's model prepared as JanusPipeline.from_pretrained prepares it: quantized, then packed."""
    return pack_linears(quantize(load_checkpoint(path, dtype=dtype).model, quantization))


def load_peak_rss_gb(path: Path, dtype: str, quantization: str | None = None) -> float:
    """Peak resident memory of a fresh process that loads and prepares the checkpoint for inference."""
    command = [sys.executable, "-c", _LOAD_PEAK_SCRIPT, str(path), dtype, *([quantization] if quantization else [])]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def _bench_weights(size: str, dtype: str) -> tuple[JanusConfig, torch.dtype, Path]:
    """The size's config, the torch dtype, and its random-weight checkpoint (written once)."""
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    config = tiny_config() if size == "tiny" else get_preset(size)
    return config, torch_dtype, _checkpoint(size, config, torch_dtype)


def _load_port(path: Path, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """transformers' JanusForConditionalGeneration on the same checkpoint, set up for image generation."""
    import transformers

    transformers.logging.set_verbosity_error()
    port = transformers.JanusForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    port.generation_config.generation_kwargs = {"boi_token_id": BOI}
    return fix_port_image_generation(port)


def fix_port_image_generation(port):
    """Let the port generate images under transformers versions whose cache helper gained an argument.

    In some 5.x releases (5.17 seen) `GenerationMixin._prepare_static_cache` requires `prefill_chunk_size`,
    which Janus's image `generate` does not pass (a TypeError); other callers pass None. Returns `port`.
    """
    prepare = port._prepare_static_cache
    needed = inspect.signature(prepare).parameters.get("prefill_chunk_size")
    if needed is not None and needed.default is inspect.Parameter.empty:
        port._prepare_static_cache = functools.partial(prepare, prefill_chunk_size=None)
    return port


def _image_prompt(config: JanusConfig) -> torch.Tensor:
    """One fixed 24-token generation prompt (1, 24): BOS, random text, <begin_of_image>."""
    prompt = torch.randint(10, config.llm.vocab_size - 10, (1, 24), generator=torch.Generator().manual_seed(1))
    prompt[0, 0], prompt[0, -1] = BOS, BOI
    return prompt


def _write_json(results: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


def _understanding_prefill(config: JanusConfig, dtype: torch.dtype, port, models: dict[str, JanusModel],
                           text_ids: torch.Tensor, repeats: int) -> dict:
    """Prompt tokens per second of the understanding prefill: one image and `text_ids`, to the first token.

    Each of `models` and the port reads BOS, the image's positions and the text, and picks one token
    greedily; best of `repeats` after a warm-up. Ratios are against the port.
    """
    image_id = config.llm.vocab_size - 1  # the benchmark checkpoint's image token (see _checkpoint)
    ids = torch.cat([torch.tensor([[BOS]]), torch.full((1, config.vision.num_patches), image_id), text_ids], dim=1)
    mask = torch.ones_like(ids, dtype=torch.bool)
    size = config.image_size
    pixels = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1).to(dtype)

    def ours_prefill(model: JanusModel) -> None:
        embeds = model.prepare_inputs_embeds(ids, pixels, ids == image_id)
        next(stream_text(model, embeds, mask, 1, eos_id=-1))

    def port_prefill() -> None:
        port.generate(input_ids=ids, attention_mask=mask.long(), pixel_values=pixels, max_new_tokens=1,
                      do_sample=False, pad_token_id=PAD)

    with torch.inference_mode():
        seconds = {name: _best_of(lambda m=model: ours_prefill(m), repeats) for name, model in models.items()}
        port_s = _best_of(port_prefill, repeats)
    tokens = ids.shape[1]
    row = {"prompt_tokens": tokens, "port_tokens_per_s": tokens / port_s}
    for name, s in seconds.items():
        row[f"{name}_tokens_per_s"] = tokens / s
        row["speedup" if name == "openjanus" else f"{name.removeprefix('openjanus_')}_speedup"] = port_s / s
    return row


def run(size: str = "tiny", dtype: str = "bfloat16", batches: tuple[int, ...] = (1, 4),
        steps: tuple[int, int] = (4, 12), repeats: int = 3, out: Path | None = None,
        quantizations: tuple[str, ...] = ("int8",), compile: bool = False) -> dict:
    """Benchmark openjanus against transformers at one size; returns (and optionally writes) the results.

    Every name in `quantizations` adds `openjanus_<name>_*` and `<name>_*` entries: openjanus on the
    same weights quantized, against the port in `dtype`; `compile` adds "compiled" entries the same
    way: openjanus with its compiled decode steps (as `JanusPipeline(compile=True)` runs them).
    """
    import transformers

    for name in quantizations:
        if check_quantization(name) is None:
            raise ValueError("quantizations lists quantized variants; 'none' is always measured")

    config, torch_dtype, path = _bench_weights(size, dtype)
    results: dict = {"size": size, "dtype": dtype, "machine": platform.processor() or platform.machine(),
                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "read_bandwidth_gb_s": read_bandwidth()}
    results["load_peak_rss_gb"] = {name or "none": load_peak_rss_gb(path, dtype, name)
                                   for name in (None, *quantizations)}
    ours = load_for_inference(path, torch_dtype)
    # Each variant: (model, image step, text step); None steps run the eager loops.
    variants = {name: (load_for_inference(path, torch_dtype, name), None, None) for name in quantizations}
    if compile:
        variants["compiled"] = (load_checkpoint(path, dtype=torch_dtype).model.eval(), compile_image_step("cpu"),
                                compile_text_step("cpu"))
    port = _load_port(path, torch_dtype)
    vocab = config.llm.vocab_size
    prompt = _image_prompt(config)

    for batch in batches:
        ids = prompt.repeat(batch, 1)
        mask = torch.ones_like(ids, dtype=torch.bool)

        def ours_image(k: int, ids=ids, mask=mask, model=ours, image_step=None):
            generate_image_tokens(model, ids, mask, PAD, 5.0, 1.0, num_tokens=k, image_step=image_step)

        def port_image(k: int, ids=ids):
            port.model.vision_model.config.num_image_tokens = k
            port.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                          do_sample=True, guidance_scale=5.0, bos_token_id=BOS, pad_token_id=PAD)

        with torch.inference_mode():
            ours_step = _per_step(ours_image, *steps, repeats)
            variant_steps = {name: _per_step(lambda k, m=model, s=step: ours_image(k, model=m, image_step=s),
                                             *steps, repeats)
                             for name, (model, step, _) in variants.items()}
            port_step = _per_step(port_image, *steps, repeats)
        tokens = config.num_image_tokens
        context = 24 + tokens // 2
        step_bytes = _step_bytes(ours, 2 * batch, context)
        row = results[f"image_batch{batch}"] = {
            "openjanus_s_per_step": ours_step, "port_s_per_step": port_step,
            "openjanus_s_per_image": ours_step * tokens / batch, "port_s_per_image": port_step * tokens / batch,
            "openjanus_image_tokens_per_s": batch / ours_step, "port_image_tokens_per_s": batch / port_step,
            "speedup": port_step / ours_step,
            "openjanus_bandwidth_gb_s": step_bytes / ours_step / 1e9,
            "bandwidth_fraction": step_bytes / ours_step / 1e9 / results["read_bandwidth_gb_s"],
        }
        for name, step in variant_steps.items():
            gb_s = _step_bytes(variants[name][0], 2 * batch, context) / step / 1e9
            row.update({f"openjanus_{name}_s_per_step": step, f"openjanus_{name}_s_per_image": step * tokens / batch,
                        f"openjanus_{name}_image_tokens_per_s": batch / step, f"{name}_speedup": port_step / step,
                        f"{name}_vs_openjanus": ours_step / step, f"openjanus_{name}_bandwidth_gb_s": gb_s,
                        f"{name}_bandwidth_fraction": gb_s / results["read_bandwidth_gb_s"]})
        gc.collect()

    text_ids = torch.randint(10, vocab - 10, (1, 50), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(text_ids, dtype=torch.bool)

    def ours_decode(k: int, model=ours, text_step=None):
        for _ in stream_text(model, model.embed_text(text_ids), mask, k, eos_id=-1, text_step=text_step):
            pass

    def port_decode(k: int):
        port.generate(input_ids=text_ids, attention_mask=torch.ones_like(text_ids), max_new_tokens=k,
                      min_new_tokens=k, do_sample=False, eos_token_id=None, pad_token_id=PAD)

    with torch.inference_mode():
        ours_tok = _per_step(ours_decode, *steps, repeats)
        variant_toks = {name: _per_step(lambda k, m=model, s=step: ours_decode(k, model=m, text_step=s),
                                        *steps, repeats)
                        for name, (model, _, step) in variants.items()}
        port_tok = _per_step(port_decode, *steps, repeats)
    text_context = text_ids.shape[1] + sum(steps) // 2
    text_gb_s = _step_bytes(ours, 1, text_context, text=True) / ours_tok / 1e9
    text = results["text_decode"] = {"openjanus_tokens_per_s": 1 / ours_tok, "port_tokens_per_s": 1 / port_tok,
                                     "speedup": port_tok / ours_tok, "openjanus_bandwidth_gb_s": text_gb_s,
                                     "bandwidth_fraction": text_gb_s / results["read_bandwidth_gb_s"]}
    for name, tok in variant_toks.items():
        gb_s = _step_bytes(variants[name][0], 1, text_context, text=True) / tok / 1e9
        text.update({f"openjanus_{name}_tokens_per_s": 1 / tok, f"{name}_speedup": port_tok / tok,
                     f"{name}_vs_openjanus": ours_tok / tok, f"openjanus_{name}_bandwidth_gb_s": gb_s,
                     f"{name}_bandwidth_fraction": gb_s / results["read_bandwidth_gb_s"]})
    results["understanding_prefill"] = _understanding_prefill(
        config, torch_dtype, port, {"openjanus": ours, **{f"openjanus_{name}": variants[name][0]
                                                         for name in quantizations}}, text_ids, repeats)
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    results["weights_gb"] = _weights_gb(ours)
    results["variants"] = list(variants)
    for name, (model, _, _) in variants.items():
        results[f"{name}_weights_gb"] = _weights_gb(model)
    _write_json(results, out)
    return results


def run_images(size: str = "tiny", device: str = "cuda", dtype: str = "bfloat16", images: int = 16,
               repeats: int = 3, out: Path | None = None) -> dict:
    """Seconds for `images` guided images of one prompt, tokens and VQ decode, as the GPU target states it.

    Times openjanus eager, openjanus with the compiled step (CUDA graphs on a GPU; its compile is
    warm-up) and the transformers port, interleaved, best of `repeats` each, on the same weights.
    """
    import transformers

    device = torch.device(device)
    config, torch_dtype, path = _bench_weights(size, dtype)
    ours = load_checkpoint(path, device=device, dtype=torch_dtype).model.eval()
    port = _load_port(path, torch_dtype, device)
    ids = _image_prompt(config).repeat(images, 1).to(device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    step = compile_image_step(device)

    def ours_images(image_step=None):
        codes = generate_image_tokens(ours, ids, mask, PAD, 5.0, 1.0, image_step=image_step)
        ours.decode_image_tokens(codes)

    def port_images():
        codes = port.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                              do_sample=True, guidance_scale=5.0, bos_token_id=BOS, pad_token_id=PAD)
        port.decode_image_tokens(codes)

    def ours_outside_steps():
        # What both openjanus systems run outside the decode steps: the (eager) prefill and the VQ decode.
        generate_image_tokens(ours, ids, mask, PAD, 5.0, 1.0, num_tokens=1)
        ours.decode_image_tokens(torch.zeros(images, config.num_image_tokens, dtype=torch.long, device=device))

    systems = {"openjanus": _synchronized(device, ours_images),
               "openjanus_compiled": _synchronized(device, lambda: ours_images(step)),
               "port": _synchronized(device, port_images)}
    best = dict.fromkeys(systems, float("inf"))
    with torch.inference_mode():
        for run in systems.values():
            run()  # warm-up; compiles the step
        for _ in range(repeats):
            for name, run in systems.items():
                best[name] = min(best[name], _timed(run))
        outside_s = _best_of(_synchronized(device, ours_outside_steps), repeats)
    bandwidth = read_bandwidth(2.0 if device.type == "cuda" else 1.0, device=device)
    tokens = config.num_image_tokens
    # Bytes of one guided step (2 rows per image) at the mean context of a whole image.
    step_bytes = _step_bytes(ours, 2 * images, ids.shape[1] + tokens // 2)
    step_s = {name: max(best[name] - outside_s, 1e-9) / (tokens - 1) for name in ("openjanus", "openjanus_compiled")}
    results = {"size": size, "dtype": dtype, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), "images": images,
               "image_size": config.image_size, "torch": torch.__version__,
               "transformers": transformers.__version__, "seconds": best,
               "speedup": {name: best["port"] / best[name] for name in ("openjanus", "openjanus_compiled")},
               "read_bandwidth_gb_s": bandwidth, "prefill_and_vq_decode_s": outside_s, "step_bytes": step_bytes,
               "step_s": step_s,
               "bandwidth_fraction": {name: step_bytes / s / 1e9 / bandwidth for name, s in step_s.items()}}
    if device.type == "cuda":
        results["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    _write_json(results, out)
    return results


def format_images_table(results: dict) -> str:
    """A plain-text table of a `run_images` result."""
    lines = [f"{results['images']} images at {results['image_size']} px, size {results['size']} {results['dtype']}, "
             f"{results['device']}, torch {results['torch']}, transformers {results['transformers']}, "
             f"read bandwidth {results['read_bandwidth_gb_s']:.0f} GB/s",
             f"{'system':20s} {'seconds':>9s} {'vs port':>8s} {'ms/step':>8s} {'of bandwidth':>12s}"]
    for name, seconds in results["seconds"].items():
        ratio = results["speedup"].get(name, 1.0)
        step = f"{results['step_s'][name] * 1e3:8.2f} {results['bandwidth_fraction'][name]:12.0%}" \
            if name in results["step_s"] else ""
        lines.append(f"{name:20s} {seconds:9.3f} {ratio:7.2f}x {step}".rstrip())
    lines.append(f"(steps: the time outside prefill and VQ decode, {results['prefill_and_vq_decode_s']:.3f} s, "
                 f"over the decode steps; {results['step_bytes'] / 1e9:.2f} GB read per step)")
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """A plain-text table of a `run` result."""
    variants = results.get("variants", [])
    lines = [f"size {results['size']} {results['dtype']}, read bandwidth {results['read_bandwidth_gb_s']:.1f} GB/s, "
             f"{results['threads']} threads, torch {results['torch']}, transformers {results['transformers']}",
             f"{'measure':34s} {'openjanus':>12s} {'transformers':>12s} {'ratio':>7s}"]
    for key, value in results.items():
        if key.startswith("image_batch"):
            lines.append(f"{key + ' s/image':34s} {value['openjanus_s_per_image']:12.3f} "
                         f"{value['port_s_per_image']:12.3f} {value['speedup']:7.2f}x")
            lines.append(f"{key + ' bandwidth GB/s (fraction)':34s} {value['openjanus_bandwidth_gb_s']:12.1f} "
                         f"{'':>12s} {value['bandwidth_fraction']:7.0%}")
            for name in variants:
                lines.append(f"{key + f' s/image {name}':34s} {value[f'openjanus_{name}_s_per_image']:12.3f} "
                             f"{value['port_s_per_image']:12.3f} {value[f'{name}_speedup']:7.2f}x")
                lines.append(f"{key + f' {name} GB/s (fraction)':34s} "
                             f"{value[f'openjanus_{name}_bandwidth_gb_s']:12.1f} {'':>12s} "
                             f"{value[f'{name}_bandwidth_fraction']:7.0%}")
    text = results["text_decode"]
    lines.append(f"{'text decode tokens/s':34s} {text['openjanus_tokens_per_s']:12.1f} "
                 f"{text['port_tokens_per_s']:12.1f} {text['speedup']:7.2f}x")
    lines.append(f"{'text decode GB/s (fraction)':34s} {text['openjanus_bandwidth_gb_s']:12.1f} {'':>12s} "
                 f"{text['bandwidth_fraction']:7.0%}")
    for name in variants:
        lines.append(f"{f'text decode tokens/s {name}':34s} {text[f'openjanus_{name}_tokens_per_s']:12.1f} "
                     f"{text['port_tokens_per_s']:12.1f} {text[f'{name}_speedup']:7.2f}x")
        lines.append(f"{f'text decode {name} GB/s (fraction)':34s} {text[f'openjanus_{name}_bandwidth_gb_s']:12.1f} "
                     f"{'':>12s} {text[f'{name}_bandwidth_fraction']:7.0%}")
    prefill = results["understanding_prefill"]
    prefill_rows = [("", "openjanus_tokens_per_s", "speedup")] + [
        (f" {name}", f"openjanus_{name}_tokens_per_s", f"{name}_speedup")
        for name in variants if f"openjanus_{name}_tokens_per_s" in prefill]
    for suffix, ours_key, ratio_key in prefill_rows:
        lines.append(f"{'understanding prefill tokens/s' + suffix:34s} {prefill[ours_key]:12.1f} "
                     f"{prefill['port_tokens_per_s']:12.1f} {prefill[ratio_key]:7.2f}x")
    lines.append(f"peak RSS {results['peak_rss_gb']:.2f} GB "
                 f"(all loaded at once; weights {results['weights_gb']:.2f} GB for openjanus and the port"
                 + "".join(f", openjanus {name} {results[f'{name}_weights_gb']:.2f} GB" for name in variants)
                 + ")")
    lines.append("openjanus alone, peak RSS of a fresh process loading for inference: "
                 + ", ".join(f"{name} {gb:.2f} GB" for name, gb in results["load_peak_rss_gb"].items()))
    return "\n".join(lines)
