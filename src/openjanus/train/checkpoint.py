"""Training checkpoints: full state (model, optimizer, scheduler, data position, RNG), written atomically.

Two formats (`runtime.checkpoint_format`):

    <stage>/checkpoint.pt       full: everything gathered on the main process, one file
    <stage>/checkpoint/         sharded: a torch.distributed.checkpoint directory, each process
        .metadata               writing its own shard of the model and optimizer state
        __<rank>_0.distcp       (`__0_0.distcp`, `__1_0.distcp`, ...)
        trainer.pt              step, config fingerprint, scheduler, task state, every process's RNG

Both are written under a temporary name and moved into place (`os.replace`), so a crash or a
Ctrl-C while saving always leaves the previous checkpoint intact. They hold only tensors and
plain containers and are read back with `torch.load(weights_only=True)` (DCP's own reader for
the shards; it reshards, so a run may resume on another number of processes).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
SHARDED_DIR = "checkpoint"
TRAINER_FILE = "trainer.pt"  # the non-tensor part of a sharded checkpoint


class ResumeError(ConfigError):
    """A checkpoint that cannot be resumed by this config."""


def atomic_save(state: Any, path: Path) -> None:
    """torch.save to a temporary file, flushed to disk, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def staging_paths(directory: Path) -> tuple[Path, Path]:
    """(where a sharded checkpoint is written, where the previous one waits while it is swapped in)."""
    return directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")


def recover_sharded(directory: Path) -> None:
    """Put back the previous sharded checkpoint if a save died between the two renames of `swap_in`."""
    retired = staging_paths(directory)[1]
    if not directory.exists() and retired.exists():
        os.replace(retired, directory)


def swap_in(staging: Path, directory: Path) -> None:
    """Replace the sharded checkpoint `directory` by the complete one at `staging`."""
    retired = staging_paths(directory)[1]
    shutil.rmtree(retired, ignore_errors=True)
    if directory.exists():
        os.replace(directory, retired)
    os.replace(staging, directory)
    shutil.rmtree(retired, ignore_errors=True)


def remove_checkpoints(stage_dir: Path) -> None:
    """Delete a stage's checkpoints of either format, leftovers of interrupted saves included."""
    (stage_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    stage_dir.joinpath(CHECKPOINT_FILE + ".tmp").unlink(missing_ok=True)
    for directory in (stage_dir / SHARDED_DIR, *staging_paths(stage_dir / SHARDED_DIR)):
        shutil.rmtree(directory, ignore_errors=True)


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint written by `atomic_save`, on the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ResumeError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None


def rng_state() -> dict[str, Any]:
    """This process's random generators (torch, CUDA, numpy, Python)."""
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"]["keys"], *state["numpy"]["rest"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _numpy_state() -> dict[str, Any]:
    _, keys, position, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "rest": [int(position), int(has_gauss), float(cached)]}


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {'a.b.c': value}."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two nested configs."""
    old_flat, new_flat = flatten(old), flatten(new)
    return sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k))


def check_resumable(state: dict[str, Any], config_hash: str, stage_config: dict[str, Any], path: Path) -> None:
    """Refuse, naming what changed, a checkpoint written by a different config."""
    if state.get("config_hash") == config_hash:
        return
    changed = changed_keys(state.get("stage_config", {}), stage_config)
    what = f"changed: {', '.join(changed[:6])}" if changed else "an earlier stage, the model or the tokenizer changed"
    raise ResumeError(f"checkpoint {path} was written by a different config ({what}); "
                      "use --no-resume to start over or --run-dir for a new run")
