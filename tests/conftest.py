"""Shared fixtures: tiny random Janus checkpoints, one per published layout, built offline."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_tokenizer import build_tiny_tokenizer  # noqa: E402

from openjanus.config import JanusConfig, LLMConfig, VisionConfig, VQConfig  # noqa: E402
from openjanus.model import JanusModel  # noqa: E402
from openjanus.processing.tokenizer import JanusTokenizer  # noqa: E402
from openjanus.weights import save_checkpoint  # noqa: E402

# 32 px images: 4x4 = 16 understanding patches (patch 8) and a 4x4 VQ grid (3 downsamplings).
TINY_HF = {
    "text_config": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256),
    "vision_config": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                          projection_dim=64, num_image_tokens=16),
    "vq_config": dict(embed_dim=4, num_embeddings=64, base_channels=32, channel_multiplier=[1, 1, 2, 2],
                      num_res_blocks=1, projection_dim=64, image_token_embed_dim=64, latent_channels=16),
}


def tiny_config(**overrides) -> JanusConfig:
    """The openjanus twin of TINY_HF."""
    config = JanusConfig(
        llm=LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256, context_length=256),
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, global_pool=""),
        vq=VQConfig(codebook_size=64, codebook_embed_dim=4, ch=32, encoder_ch_mult=[1, 1, 2, 2],
                    decoder_ch_mult=[1, 1, 2, 2], z_channels=16, num_res_blocks=1, codebook_show_usage=False),
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config.validate()


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Large random weights so that differences show; codebook rows made unit-norm (official l2 rule)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
            if name.endswith("quantize.embedding.weight"):
                param.copy_(torch.nn.functional.normalize(param, dim=-1))


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_file) -> Path:
    """A random tiny model in the openjanus layout."""
    torch.manual_seed(0)
    model = JanusModel(tiny_config())
    randomize(model, seed=1)
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny"), tokenizer_file=tokenizer_file)


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory, tokenizer_file) -> Path:
    """A random tiny `JanusForConditionalGeneration` saved with transformers' own save_pretrained."""
    transformers = pytest.importorskip("transformers")
    warnings.filterwarnings("ignore")
    tokenizer = JanusTokenizer.from_file(tokenizer_file)
    config = transformers.JanusConfig(**TINY_HF, tie_word_embeddings=False, image_token_id=tokenizer.image_id)
    torch.manual_seed(0)
    model = transformers.JanusForConditionalGeneration(config).eval()
    randomize(model, seed=2)
    out = tmp_path_factory.mktemp("hf")
    model.save_pretrained(out)
    (out / "tokenizer.json").write_bytes(Path(tokenizer_file).read_bytes())
    return out


@pytest.fixture(scope="session")
def hf_model(hf_model_dir):
    """The transformers oracle, loaded back from disk."""
    import transformers

    model = transformers.JanusForConditionalGeneration.from_pretrained(hf_model_dir).eval()
    return model


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def interrupted_after(step: int):
    """A StageTrainer.train_step that raises KeyboardInterrupt (Ctrl-C) once `step` is done."""
    from openjanus.train.loop import StageTrainer

    original = StageTrainer.train_step

    def train_step(self):
        result = original(self)
        if self.step == step:
            raise KeyboardInterrupt
        return result

    return train_step


def run_until_interrupted(config: Path, run_dir: Path, step: int, monkeypatch) -> None:
    """Run a recipe that Ctrl-C stops after `step` (its last checkpoint is then at `step` - 1)."""
    from openjanus.train import run
    from openjanus.train.loop import StageTrainer

    with monkeypatch.context() as patch:
        patch.setattr(StageTrainer, "train_step", interrupted_after(step))
        with pytest.raises(KeyboardInterrupt):
            run(config, run_dir=run_dir, echo=lambda _: None)
