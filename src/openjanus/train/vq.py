"""The VQ tokenizer trainer (LlamaGen VQ-16 recipe without LPIPS, which needs downloaded weights).

Loss per image: L2 (or L1) reconstruction + codebook loss + commitment loss (beta 0.25 inside
the quantiser), plus, when enabled, LlamaGen's hinge PatchGAN: the generator term
-mean(D(reconstruction)) and a separately optimised discriminator.

Two options against the collapse that small VQ models show on flat ShapesWorld images (the
decoder settles on the mean image and the codebook on a handful of codes within 100 steps):
a warm-up as a plain autoencoder (the decoder sees the normalised latents, not their codes,
until `quantize_start_step`, when every code is re-seeded from latents), and restarts of the
codes no image used for `codebook_restart_every` steps.
The end-of-stage report gives PSNR, codebook usage and, on ShapesWorld, the reference checker's
score on reconstructions of rendered GenEval-style prompts next to its score on the renders
themselves (the oracle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..data.shapes import ShapesImages, example_rng, render_scene
from ..processing.image import preprocess_image, tensor_to_pil
from ..worlds import shapes as world
from .distributed import all_reduce_sum, wrap_model
from .tasks import LossOutput, Task

EVAL_BATCH = 16


@dataclass
class ImageBatch:
    """Images in [-1, 1] (N, 3, H, W) and the global step they belong to."""

    images: torch.Tensor
    step: int

    def to(self, device) -> ImageBatch:
        """The batch on `device`."""
        return ImageBatch(self.images.to(device), self.step)


@dataclass
class ReconstructionOutput:
    """What the steps after the optimizer step need from a micro-batch."""

    images: torch.Tensor
    reconstructions: torch.Tensor
    latents: torch.Tensor  # (N * h * w, C) encoder outputs as the quantiser compares them
    indices: torch.Tensor  # (N, h * w) chosen codes


class PatchDiscriminator(nn.Module):
    """LlamaGen's NLayerDiscriminator: 4x4 convolutions, BatchNorm, LeakyReLU(0.2), one logit per patch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for index in range(1, layers + 1):
            out = channels * min(2 ** index, 8)
            stride = 2 if index < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.layers = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class VQObjective(nn.Module):
    """Reconstruction, codebook, commitment and (optionally) adversarial loss of the VQ model."""

    def __init__(self, model, loss, discriminator: PatchDiscriminator | None):
        super().__init__()
        self.model, self.loss = model, loss
        # A plain list keeps the discriminator out of this module's parameters: it has its own optimizer.
        self.discriminators = [discriminator] if discriminator is not None else []

    def forward(self, batch: ImageBatch) -> LossOutput:
        images, vq = batch.images, self.model.gen_vision_model
        # VQModel.forward, unrolled to keep the latents for codebook restarts.
        latents = vq.latents(images)
        z_q, indices, codebook_loss, commit_loss = vq.quantize(latents)
        if batch.step < self.loss.quantize_start_step:
            # Autoencoder warm-up: no code in the way, and no pull of the latents towards still-random codes.
            z_q = F.normalize(latents, dim=1) if vq.quantize.l2_norm else latents
            commit_loss = torch.zeros_like(commit_loss)
        recon = vq.decode(z_q)
        error = recon.float() - images
        per_image = (error.pow(2) if self.loss.reconstruction == "l2" else error.abs()).mean(dim=(1, 2, 3))
        n = images.shape[0]
        loss_sum = (self.loss.reconstruction_weight * per_image.sum()
                    + n * (self.loss.codebook_weight * codebook_loss + self.loss.commitment_weight * commit_loss))
        mse = error.detach().pow(2).mean(dim=(1, 2, 3))
        count = images.new_tensor(float(n))
        metrics = {"loss_reconstruction": (per_image.detach().sum(), count),
                   "loss_codebook": (codebook_loss.detach() * n, count),
                   "loss_commitment": (commit_loss.detach() * n, count),
                   "psnr": ((10 * torch.log10(4.0 / mse.clamp(min=1e-10))).sum(), count),
                   # Fraction of the codebook this micro-batch uses: collapse onto few codes is the usual failure.
                   "codebook_usage": (count * indices.unique().numel() / self.model.config.vq.codebook_size, count)}
        adversarial = self.loss.adversarial
        if self.discriminators and batch.step >= adversarial.start_step:
            discriminator = self.discriminators[0]
            # Generator term through a frozen copy of the weights: only the VQ model gets these gradients.
            frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
            logits = functional_call(discriminator, {**frozen, **dict(discriminator.named_buffers())}, (recon,))
            generator_loss = -logits.float().mean(dim=(1, 2, 3))
            loss_sum = loss_sum + adversarial.weight * generator_loss.sum()
            metrics["loss_generator"] = (generator_loss.detach().sum(), count)
        metrics["loss"] = (loss_sum.detach(), count)
        rows = latents.detach().float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        if vq.quantize.l2_norm:
            rows = F.normalize(rows, dim=-1)
        return LossOutput(loss_sum, metrics, ReconstructionOutput(images, recon.detach(), rows, indices))


class VQTask(Task):
    """Train `gen_vision_model` on ShapesWorld renders (optionally random crops)."""

    throughput_unit = "images"

    def __init__(self, stage, model, tokenizer, context):
        super().__init__(stage, model, tokenizer, context)
        adversarial = stage.loss.adversarial
        self.discriminator = None
        if adversarial.enabled:
            self.discriminator = PatchDiscriminator(adversarial.channels, adversarial.layers)
        self.objective = VQObjective(model, stage.loss, self.discriminator)
        self.images = {split: ShapesImages(stage.data.seed, model.config.image_size, stage.data.crop_size, split)
                       for split in ("train", "validation")}
        self.discriminator_optimizer = None
        self.code_counts = torch.zeros(model.config.vq.codebook_size, dtype=torch.long)

    def shard_units(self) -> list[nn.Module]:
        """No transformer blocks run here: FSDP shards the objective as one unit."""
        return []

    def on_device(self, device: torch.device, strategy: str) -> None:
        """Move and wrap the discriminator and build its optimizer (LlamaGen: Adam with the stage's settings)."""
        restarts = self.stage.loss.codebook_restart_every or self.stage.loss.quantize_start_step
        if restarts:
            self.refuse_fsdp(strategy, "codebook restarts need whole codebooks")
        if self.discriminator is None:
            return
        self.discriminator.to(device)
        self.wrapped_discriminator = wrap_model(self.discriminator, "ddp", self.context, [])
        optim = self.stage.optim
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=optim.lr,
                                                        betas=tuple(optim.betas))

    def batch(self, step: int, slots: list[int], split: str = "train") -> ImageBatch:
        start, side = step * self.stage.batch_size, self.stage.data.crop_size or self.model.config.image_size
        return ImageBatch(torch.stack([preprocess_image(self.images[split][start + s], side) for s in slots]), step)

    def count(self, batch: ImageBatch) -> int:
        return batch.images.shape[0]

    def after_step(self, step: int, outputs: list[ReconstructionOutput]) -> dict[str, float]:
        """Codebook restarts and the discriminator step, when enabled."""
        metrics = {}
        if self.stage.loss.codebook_restart_every or self.stage.loss.quantize_start_step:
            metrics.update(self.restart_dead_codes(step, outputs))
        if self.discriminator is not None and step >= self.stage.loss.adversarial.start_step:
            metrics.update(self.discriminator_step(outputs))
        return metrics

    @torch.no_grad()
    def restart_dead_codes(self, step: int, outputs: list[ReconstructionOutput]) -> dict[str, float]:
        """Restart the codes no process chose since the last restart, every `codebook_restart_every` steps,
        and every code at the end of the autoencoder warm-up.

        They move onto (slightly jittered) encoder outputs of this step, drawn by the main process and broadcast.
        """
        for out in outputs:
            self.code_counts += torch.bincount(out.indices.flatten().cpu(), minlength=len(self.code_counts))
        reseed = step + 1 == self.stage.loss.quantize_start_step  # the end of the warm-up: every code
        every = self.stage.loss.codebook_restart_every
        if not reseed and not (every and (step + 1) % every == 0):
            return {}
        device = self.context.device
        counts = all_reduce_sum(self.code_counts.to(device), self.context)
        dead = torch.arange(len(counts), device=device) if reseed else (counts == 0).nonzero().flatten()
        self.code_counts.zero_()
        weight = self.model.gen_vision_model.quantize.embedding.weight
        if len(dead) and self.context.is_main:
            latents = torch.cat([out.latents for out in outputs]).cpu()
            generator = torch.Generator().manual_seed(self.stage.data.seed * 1_000_003 + step)
            chosen = latents[torch.randint(len(latents), (len(dead),), generator=generator)]
            jitter = torch.randn(chosen.shape, generator=generator) * 0.01 * latents.std()
            weight[dead] = (chosen + jitter).to(weight)
        if len(dead) and self.context.enabled:
            dist.broadcast(weight.data, src=0)
        return {"codes_restarted": float(len(dead))}

    def discriminator_step(self, outputs: list[ReconstructionOutput]) -> dict[str, float]:
        """One hinge-loss discriminator step on this step's real images and reconstructions."""
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for out in outputs:
            real, fake = out.images, out.reconstructions
            logits = self.wrapped_discriminator(torch.cat([real, fake.float()]))
            real_logits, fake_logits = logits.float().chunk(2)
            loss = (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()) / len(outputs)
            loss.backward()
            total += float(loss.detach())
        if self.stage.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.stage.optim.grad_clip)
        self.discriminator_optimizer.step()
        return {"loss_discriminator": total}

    def state_dict(self) -> dict:
        state = {"code_counts": self.code_counts.clone()}
        if self.discriminator is not None:
            state.update(discriminator=self.discriminator.state_dict(),
                         discriminator_optimizer=self.discriminator_optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.code_counts.copy_(state["code_counts"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """PSNR, codebook usage and checker scores (reconstructions vs renders) on held-out prompts."""
        count = self.stage.data.eval_images
        if not count:
            return {}
        size = model.config.image_size
        prompts, renders = [], []
        for index in range(count):
            rng = example_rng(self.stage.data.seed, "evaluation", index, split="validation")
            prompt = world.sample_prompt(rng, world.TASKS[index % len(world.TASKS)])
            image = render_scene(world.scene_for_prompt(rng, prompt, world.MIN_SIZE), size)
            prompts.append(prompt)
            renders.append(image.resize((size, size)) if image.size[0] != size else image)
        vq = model.gen_vision_model
        device = next(vq.parameters()).device
        reconstructions, codes = [], []
        for start in range(0, count, EVAL_BATCH):
            pixels = torch.stack([preprocess_image(i, size) for i in renders[start:start + EVAL_BATCH]]).to(device)
            recon, indices, _, _ = vq(pixels)
            reconstructions += tensor_to_pil(recon.float().cpu())
            codes.append(indices.cpu())
        originals = np.stack([np.asarray(i, dtype=np.float64) for i in renders])
        rebuilt = np.stack([np.asarray(i, dtype=np.float64) for i in reconstructions])
        mse = ((originals - rebuilt) ** 2).mean(axis=(1, 2, 3))
        psnr = float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))
        return {
            "eval_psnr": psnr,
            "eval_codebook_usage": len(torch.cat(codes).unique()) / model.config.vq.codebook_size,
            "eval_checker_reconstruction": world.score_images(zip(reconstructions, prompts))["overall"],
            "eval_checker_oracle": world.score_images(zip(renders, prompts))["overall"],
        }

    def activation_bytes(self, micro_batch_size: int, bytes_per_value: int, checkpointing: bool = False) -> int:
        # No transformer blocks: activation checkpointing changes nothing here.
        config = self.model.config.vq
        side = self.stage.data.crop_size or self.model.config.image_size
        per_image = 0
        for level, mult in enumerate(config.encoder_ch_mult):
            # Encoder and decoder, ~8 saved maps per residual block (norms, activations, convolutions).
            per_image += (side >> level) ** 2 * config.ch * mult * (config.num_res_blocks * 2 + 1) * 8
        return micro_batch_size * per_image * bytes_per_value
