"""Trainers for the whole Janus recipe: VQ tokenizer, understanding encoder, LLM and Janus stages I-III.

One loop (`loop.StageTrainer`) runs every stage on one process or many (torchrun + DDP/FSDP2);
`run` runs a recipe YAML, each stage starting from the previous stage's output directory.
"""

from .config import RecipeConfig, StageConfig, load_recipe, recipe_from_dict
from .runner import default_run_dir, run

__all__ = ["RecipeConfig", "StageConfig", "default_run_dir", "load_recipe", "recipe_from_dict", "run"]
