"""The command line: real runs on a tiny checkpoint, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from openjanus.cli import app

runner = CliRunner()


def _run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_generate_writes_native_size_pngs(tmp_path, tiny_model_dir):
    result = _run("generate", "a photo of a red circle", "a photo of a square", "-n", "2", "--seed", "1",
                  "--model", tiny_model_dir, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["000.png", "001.png", "002.png", "003.png"]
    assert Image.open(files[0]).size == (32, 32)
    jacobi = _run("generate", "a photo of a red circle", "--temperature", "0", "--jacobi-window", "4",
                  "--model", tiny_model_dir, "-o", tmp_path / "jacobi")
    plain = _run("generate", "a photo of a red circle", "--temperature", "0", "--model", tiny_model_dir,
                 "-o", tmp_path / "plain")
    assert jacobi.exit_code == plain.exit_code == 0, jacobi.output + plain.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "jacobi" / "000.png")),
                          np.asarray(Image.open(tmp_path / "plain" / "000.png")))


def test_ask_and_chat(tmp_path, tiny_model_dir):
    image = tmp_path / "x.png"
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(image)
    result = _run("ask", image, "What color is the circle?", "--model", tiny_model_dir, "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    session = f"/image {image}\nWhat color?\nAnd the shape?\n/reset\nhello\n/exit\n"
    result = _run("chat", "--model", tiny_model_dir, "--max-new-tokens", "4", input=session)
    assert result.exit_code == 0, result.output
    assert result.output.count("janus> ") == 3
    assert "(attached" in result.output and "(history cleared)" in result.output


def test_convert_and_info(tmp_path, tiny_model_dir):
    for layout in ("official", "hf", "openjanus"):
        result = _run("convert", tiny_model_dir, tmp_path / layout, "--to", layout)
        assert result.exit_code == 0, result.output
        assert (tmp_path / layout / "model.safetensors").exists()
        info = _run("info", "--model", tmp_path / layout, "--json")
        assert info.exit_code == 0, info.output
        assert json.loads(info.output)["layout"] == layout
    preset = _run("info", "--preset", "janus-pro-1b", "--json")
    assert json.loads(preset.output)["total"] == 2_089_297_547


def test_convert_keeps_named_components_in_float32(tmp_path, tiny_model_dir):
    from openjanus.weights import iter_tensors

    result = _run("convert", tiny_model_dir, tmp_path / "mixed", "--dtype", "bfloat16",
                  "--keep-float32", "gen_vision_model")
    assert result.exit_code == 0, result.output
    dtypes = {key: str(t.dtype) for key, t in iter_tensors(tmp_path / "mixed") if t.is_floating_point()}
    assert {d for k, d in dtypes.items() if k.startswith("gen_vision_model.")} == {"torch.float32"}
    assert {d for k, d in dtypes.items() if not k.startswith("gen_vision_model.")} == {"torch.bfloat16"}


@pytest.mark.parametrize("args, message", [
    (["generate", "a circle", "--model", "/nonexistent/dir"], "does not exist"),
    (["generate", "", "--model", "{model}"], "prompt is empty"),
    (["generate", "a circle", "-n", "0", "--model", "{model}"], "num_images_per_prompt"),
    (["generate", "a circle", "--temperature", "-1", "--model", "{model}"], "temperature"),
    (["generate", "a circle", "--jacobi-window", "-2", "--model", "{model}"], "jacobi_window"),
    (["ask", "{notimage}", "What?", "--model", "{model}"], "not a recognised image"),
    (["ask", "/no/such.png", "What?", "--model", "{model}"], "not found"),
    (["convert", "{model}", "{out}", "--to", "onnx"], "--to must be one of"),
    (["convert", "{model}", "{out}", "--keep-float32", "vq"], "unknown component vq"),
    (["info", "--preset", "gpt-9"], "unknown preset"),
])
def test_errors_are_one_line(tmp_path, tiny_model_dir, args, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    args = [a.format(model=tiny_model_dir, notimage=bad, out=tmp_path / "o") for a in args]
    result = _run(*args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_no_default_model_says_so(monkeypatch, tmp_path):
    import openjanus.pipeline as pipeline

    monkeypatch.setattr(pipeline, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    result = _run("generate", "a circle")
    assert result.exit_code == 1
    assert result.output.strip() == ("error: no default model is shipped with this openjanus yet; "
                                     "pass a checkpoint directory (--model PATH)")
