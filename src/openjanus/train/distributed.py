"""Multi-process training on PyTorch's own parts: torchrun sets up the processes, DDP or FSDP2 wraps.

Launch with `torchrun --nproc_per_node=N -m openjanus.train CONFIG` (or the `openjanus` script);
the backend is nccl on CUDA and gloo on CPU. With one process nothing is wrapped.

FSDP2 shards every transformer block and then the rest of the objective; with `param_dtype`
(bf16 stages) the shards stay fp32 (the optimizer's master weights) while each block is
gathered in bf16 for its forward and backward, and gradients are reduced in fp32.
`checkpoint_activations` makes blocks recompute their activations in the backward pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn


@dataclass
class DistributedContext:
    """This process's place in the job and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """The device for `preference` (auto | cpu | cuda) on this process."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("runtime.device is cuda but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistributedContext:
    """Join the torchrun job described by the environment, if any (one process otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistributedContext(rank=rank, world_size=world_size, device=device)


def wrap_model(module: nn.Module, strategy: str, context: DistributedContext,
               shard_units: list[nn.Module], param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` on every unit, then the root), when there are several processes.

    Under FSDP, `param_dtype` is the dtype parameters are gathered and computed in (gradients
    are reduce-scattered in fp32 and the sharded parameters stay in their own dtype).
    """
    if not context.enabled:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device] if context.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # An explicit mesh on the model's device type keeps FSDP from moving a CPU model to CUDA.
    mesh = init_device_mesh(context.device.type, (context.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for unit in shard_units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def checkpoint_activations(modules: list[nn.Module]) -> None:
    """Make each module keep only its inputs for the backward pass and recompute the rest there.

    The module's own `forward` is wrapped (in place, so parameter names and checkpoints do not
    change) in non-reentrant `torch.utils.checkpoint`, which restores the random state and the
    autocast state when it recomputes: the gradients are those of the plain forward. FSDP's hooks
    stay outside the recomputed part, so a block's parameters are gathered once per pass. Without
    gradients (evaluation) the plain forward runs.
    """
    for module in modules:
        if getattr(module, "_openjanus_checkpointed", False):
            continue
        forward = module.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        module.forward = checkpointed
        module._openjanus_checkpointed = True


@contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of accumulation micro-batches before the last one."""
    if enabled:
        yield
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum of `tensor` over all processes (in place; returned for chaining)."""
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_flag(flag: bool, context: DistributedContext) -> bool:
    """Rank 0's value of `flag` on every process (decisions based on wall time must agree)."""
    if not context.enabled:
        return flag
    value = torch.tensor([int(flag)], device=context.device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def all_gather_objects(value, context: DistributedContext) -> list:
    """`value` from every process, in rank order."""
    if not context.enabled:
        return [value]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(context: DistributedContext) -> None:
    """Wait for every process."""
    if context.enabled:
        dist.barrier()
