"""JanusPipeline: the one public entry point that the CLI, the server and the evaluations call."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import JanusConfig
from .generation import (
    MAX_JACOBI_WINDOW,
    check_sampling,
    compile_image_step,
    compile_text_step,
    generate_image_tokens,
    make_generator,
    stream_text,
)
from .model import JanusModel
from .model.kernels import pack_linears
from .model.quant import check_quantization, quantize
from .processing.chat import ChatFormat, chat_format_for
from .processing.image import tensor_to_pil
from .processing.inputs import generation_batch, understanding_batch
from .processing.tokenizer import JanusTokenizer
from .weights import load_checkpoint, resolve_dtype

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "shapes-tiny"


class ModelNotAvailableError(RuntimeError):
    """No model was given and no default model is shipped."""


def default_model_dir() -> Path:
    """The shipped default model, or a clear error when it is not there."""
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise ModelNotAvailableError(
            "no default model is shipped with this openjanus yet; pass a checkpoint directory (--model PATH)")
    return DEFAULT_MODEL_DIR


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_dtype(device: str, config: JanusConfig) -> torch.dtype:
    # bf16 on GPUs; on CPUs float32 unless the model is big enough for memory to matter.
    if str(device).startswith("cuda"):
        return torch.bfloat16
    big = config.llm.num_layers * config.llm.hidden_size ** 2 * 12 > 1e9
    return torch.bfloat16 if big else torch.float32


class JanusPipeline:
    """Understanding (`ask`, `chat`) and text-to-image (`generate_images`) with one Janus model."""

    def __init__(self, model: JanusModel, tokenizer: JanusTokenizer, chat_format: ChatFormat | None = None,
                 compile: bool = False):
        self.model = model.eval()
        # Compiled lazily, on the first image and the first answer of each batch shape.
        self.image_step = compile_image_step(self.device) if compile else None
        self.text_step = compile_text_step(self.device) if compile else None
        self.tokenizer = tokenizer
        self.chat_format = chat_format or chat_format_for(model.config.sft_format)
        if tokenizer.vocab_size > model.config.llm.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only "
                             f"{model.config.llm.vocab_size} embeddings")

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | None = None,
                        dtype: str | torch.dtype | None = None, quantization: str | None = None,
                        compile: bool = False) -> JanusPipeline:
        """Load a local checkpoint directory (official, transformers or openjanus layout); None = shipped model.

        `quantization="int8"` stores the LLM's linear layers and heads as int8 with per-channel
        scales (about half the bf16 bytes, faster decoding on CPU); the rest stays in `dtype`.
        On CPU in bf16 the remaining linear layers are packed for oneDNN (same results, faster).
        `compile=True` runs each decode step (image tokens and text) through torch.compile: captured
        as CUDA graphs on a GPU, where eager steps are launch-bound; on CPU with the weights frozen
        into the graph (packed, q/k/v and gate/up concatenated; a second copy of the weights in
        memory). The first image or answer of each batch shape pays for compiling.
        """
        from .weights import read_config

        quantization = check_quantization(quantization)
        path = Path(path) if path is not None else default_model_dir()
        device = device or default_device()
        config, _ = read_config(path)
        dtype = resolve_dtype(dtype) or _default_dtype(device, config)
        checkpoint = load_checkpoint(path, device=device, dtype=dtype)
        tokenizer = JanusTokenizer.from_file(path / "tokenizer.json")
        model = quantize(checkpoint.model, quantization)
        # oneDNN-packed weights are opaque to torch.compile, which lays weights out itself.
        return cls(model if compile else pack_linears(model), tokenizer, compile=compile)

    @property
    def config(self) -> JanusConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.backbone.embed_tokens.weight.device

    # ------------------------------------------------------------------ understanding

    def stream_answers(self, conversations: Sequence[Sequence[Mapping[str, Any]]], max_new_tokens: int = 512,
                       temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                       seed: int | None = None, stop: Sequence[str] | None = None,
                       system_prompt: str | None = None) -> Iterator[list[str]]:
        """Yield, per decoding step, the new text of every conversation (batched, left-padded)."""
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not conversations:
            raise ValueError("no conversation given")
        batch = understanding_batch(conversations, self.tokenizer, self.chat_format, self.config.image_size,
                                    self.config.vision.num_patches, system_prompt).to(self.device)
        room = self.config.llm.context_length - batch.input_ids.shape[1]
        if room < 1:
            raise ValueError(f"prompt is {batch.input_ids.shape[1]} tokens; the model's context is "
                             f"{self.config.llm.context_length}")
        embeds = self.model.prepare_inputs_embeds(batch.input_ids, batch.pixel_values, batch.image_mask)
        rows = [_StopText(self.tokenizer, stop or ()) for _ in conversations]
        steps = stream_text(self.model, embeds, batch.padding_mask, min(max_new_tokens, room),
                            self.tokenizer.eos_id, temperature, top_k, top_p, make_generator(seed, self.device),
                            text_step=self.text_step)
        for tokens in steps:
            yield [row.push(int(t)) for row, t in zip(rows, tokens.tolist())]
            if all(row.done for row in rows):
                break
        tail = [row.finish() for row in rows]
        if any(tail):
            yield tail

    def answer(self, conversations: Sequence[Sequence[Mapping[str, Any]]], **kwargs) -> list[str]:
        """The full answer to every conversation of a batch."""
        texts = [""] * len(conversations)
        for pieces in self.stream_answers(conversations, **kwargs):
            texts = [t + p for t, p in zip(texts, pieces)]
        return texts

    def ask(self, image, question: str, **kwargs) -> str:
        """Answer one question about one image (or several images given as a list)."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        _check_text(question, "question")
        return self.answer([[{"role": "user", "content": question, "images": images}]], **kwargs)[0]

    def chat(self, messages: Sequence[Mapping[str, Any]], stream: bool = False, **kwargs):
        """Reply to a multi-turn conversation; with stream=True, an iterator of text pieces."""
        if stream:
            return (pieces[0] for pieces in self.stream_answers([messages], **kwargs) if pieces[0])
        return self.answer([messages], **kwargs)[0]

    # ------------------------------------------------------------------ generation

    def generate_image_tokens(self, prompts: str | Sequence[str], num_images_per_prompt: int = 1,
                              guidance_scale: float = 5.0, temperature: float = 1.0, top_k: int | None = None,
                              top_p: float | None = None, seed: int | None = None,
                              progress: bool = True, cfg_weight: float | None = None,
                              on_step: Callable[[], None] | None = None, jacobi_window: int = 0,
                              stats: dict | None = None) -> torch.Tensor:
        """Image-token grids (len(prompts) * num_images_per_prompt, tokens), prompt-major.

        `on_step` is called after every image token (for progress or cancellation: an exception it
        raises stops the generation). `jacobi_window` > 1 turns on speculative Jacobi decoding: up to
        that many tokens per forward pass, the same output distribution (off by default). `stats`, when
        given, receives "forward_passes".
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompt given")
        for prompt in prompts:
            _check_text(prompt, "prompt")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt}")
        if cfg_weight is not None:
            guidance_scale = cfg_weight
        check_sampling(temperature, top_k, top_p)
        if not isinstance(jacobi_window, int) or not 0 <= jacobi_window <= MAX_JACOBI_WINDOW:
            raise ValueError(f"jacobi_window must be an integer from 0 (off) to {MAX_JACOBI_WINDOW}, "
                             f"got {jacobi_window}")
        batch = generation_batch([p for p in prompts for _ in range(num_images_per_prompt)],
                                 self.tokenizer, self.chat_format).to(self.device)
        needed = batch.input_ids.shape[1] + self.config.num_image_tokens
        if needed > self.config.llm.context_length:
            raise ValueError(f"prompt too long: {batch.input_ids.shape[1]} prompt tokens + "
                             f"{self.config.num_image_tokens} image tokens exceed the context of "
                             f"{self.config.llm.context_length}")
        bar = tqdm(total=self.config.num_image_tokens, desc="image tokens", disable=not progress, leave=False)

        def step() -> None:
            bar.update()
            if on_step is not None:
                on_step()

        try:
            return generate_image_tokens(self.model, batch.input_ids, batch.padding_mask, self.tokenizer.pad_id,
                                         guidance_scale, temperature, top_k, top_p,
                                         make_generator(seed, self.device), on_step=step,
                                         jacobi_window=jacobi_window, stats=stats, image_step=self.image_step)
        finally:
            bar.close()

    @torch.inference_mode()
    def decode_images(self, codes: torch.Tensor) -> list[Image.Image]:
        """PIL images from image-token grids, one VQ decode at a time to bound memory."""
        images = []
        for row in codes:
            pixels = self.model.decode_image_tokens(row[None].to(self.device))
            images += tensor_to_pil(pixels.float().cpu())
        return images

    def generate_images(self, prompts: str | Sequence[str], **kwargs) -> list[Image.Image]:
        """Images for each prompt (prompt-major), at the checkpoint's native size."""
        return self.decode_images(self.generate_image_tokens(prompts, **kwargs))


def _check_text(text: Any, what: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what} is empty")


class _StopText:
    """Incremental text of one answer: stops at EOS or a stop string, never emitting part of one."""

    def __init__(self, tokenizer: JanusTokenizer, stop: Sequence[str]):
        self.decoder = tokenizer.stream_decoder()
        self.eos_id = tokenizer.eos_id
        self.stop = [s for s in stop if s]
        self.text = ""
        self.emitted = 0
        self.done = False

    def _release(self, final: bool) -> str:
        cut = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if cut:
            self.text, self.done, final = self.text[:min(cut)], True, True
        hold = 0 if final else max((len(s) - 1 for s in self.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token == self.eos_id:
            self.text += self.decoder.flush()
            self.done = True
            return self._release(final=True)
        self.text += self.decoder.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        if self.done and self.emitted == len(self.text):
            return ""
        self.text += self.decoder.flush()
        self.done = True
        return self._release(final=True)
