"""Tests for openjanus.processing: tokenizer, chat prompts, image pre/post-processing."""

from __future__ import annotations

import io
import json
import resource
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, processors

from openjanus.processing import (
    BOI_TOKEN,
    BOS_TOKEN,
    DEFAULT_SYSTEM_PROMPT,
    EOI_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    JanusTokenizer,
    chat_format_for,
    image_generation_prompt,
    load_image,
    preprocess_image,
    preprocess_images,
    render_conversation,
    tensor_to_pil,
)

try:
    from tiny_tokenizer import ASSISTANT_TOKEN, USER_TOKEN, build_hf_tokenizer, build_tiny_tokenizer
except ImportError:  # tests/ collected as a package
    from tests.tiny_tokenizer import ASSISTANT_TOKEN, USER_TOKEN, build_hf_tokenizer, build_tiny_tokenizer

PRO = chat_format_for("deepseek")
OLD = chat_format_for("deepseek_old")
MULTIBYTE_TEXT = "Café naïve façade – 😀🎨 日本語 yes"


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(directory)
    return directory / "tokenizer.json"


@pytest.fixture()
def tokenizer(tokenizer_path):
    return JanusTokenizer.from_file(tokenizer_path)


def _tokenizer_json(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_special_token_strings_use_fullwidth_bars():
    assert BOS_TOKEN == "<｜begin▁of▁sentence｜>"
    assert EOS_TOKEN == "<｜end▁of▁sentence｜>"
    assert PAD_TOKEN == "<｜▁pad▁｜>"
    assert (IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN) == ("<image_placeholder>", "<begin_of_image>", "<end_of_image>")


def test_tiny_tokenizer_is_deterministic(tmp_path, tokenizer_path):
    build_tiny_tokenizer(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == tokenizer_path.read_bytes()
    size = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    assert 300 <= size <= 500


def test_special_tokens_resolved_by_string(tokenizer, tokenizer_path):
    backend = Tokenizer.from_file(str(tokenizer_path))
    expected = {
        "bos_id": BOS_TOKEN, "eos_id": EOS_TOKEN, "pad_id": PAD_TOKEN,
        "image_id": IMAGE_TOKEN, "boi_id": BOI_TOKEN, "eoi_id": EOI_TOKEN,
    }
    for attribute, token in expected.items():
        assert getattr(tokenizer, attribute) == backend.token_to_id(token)
    # The tiny tokenizer's ids are unlike any real checkpoint's, so hard-coded ids would fail.
    assert tokenizer.bos_id != 100000 and tokenizer.pad_id != 100002
    assert tokenizer.pad_id != tokenizer.bos_id + 2
    assert len({getattr(tokenizer, attribute) for attribute in expected}) == 6
    assert tokenizer.vocab_size == backend.get_vocab_size(with_added_tokens=True)


def test_pad_falls_back_to_eos(tmp_path):
    build_tiny_tokenizer(tmp_path, include_pad=False)
    tokenizer = JanusTokenizer.from_file(tmp_path)
    assert tokenizer.token_to_id(PAD_TOKEN) is None
    assert tokenizer.pad_id == tokenizer.eos_id


@pytest.mark.parametrize("token", [IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN, BOS_TOKEN])
def test_missing_required_token_is_named(tmp_path, tokenizer_path, token):
    data = _tokenizer_json(tokenizer_path)
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["content"] != token]
    data["model"]["vocab"].pop(token, None)
    data["post_processor"] = None
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=token.replace("|", r"\|")):
        JanusTokenizer.from_file(path)


def test_special_token_held_as_plain_vocab_entry_is_matched_whole(tmp_path, tokenizer_path):
    data = _tokenizer_json(tokenizer_path)
    (entry,) = [entry for entry in data["added_tokens"] if entry["content"] == BOI_TOKEN]
    data["added_tokens"].remove(entry)
    data["model"]["vocab"][BOI_TOKEN] = entry["id"]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    # Without registration a byte-level BPE would split the string into pieces.
    assert len(Tokenizer.from_file(str(path)).encode(BOI_TOKEN, add_special_tokens=False).ids) > 1
    tokenizer = JanusTokenizer.from_file(path)
    assert tokenizer.boi_id == entry["id"]
    assert tokenizer.encode(f"a cat{BOI_TOKEN}")[-1] == entry["id"]


def test_encode_prepends_bos_and_maps_special_strings(tokenizer):
    ids = tokenizer.encode(f"{USER_TOKEN}: {IMAGE_TOKEN}\nWhat color?")
    assert ids[0] == tokenizer.bos_id
    assert ids[1] == tokenizer.token_to_id(USER_TOKEN)
    assert ids.count(tokenizer.image_id) == 1
    assert tokenizer.encode(f"{BOI_TOKEN}{EOI_TOKEN}", add_bos=False) == [tokenizer.boi_id, tokenizer.eoi_id]
    assert tokenizer.encode("", add_bos=True) == [tokenizer.bos_id]
    assert tokenizer.encode("a red circle")[1:] == tokenizer.encode("a red circle", add_bos=False)
    with pytest.raises(TypeError):
        tokenizer.encode(["not", "a", "str"])


def test_encode_does_not_depend_on_post_processor(tokenizer_path):
    prompt = image_generation_prompt("a photo of a red circle", PRO)
    with_template = JanusTokenizer.from_file(tokenizer_path)
    backend = Tokenizer.from_file(str(tokenizer_path))
    assert with_template.encode(prompt) == backend.encode(prompt).ids  # same as the BOS template

    for post_processor in (None, processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, backend.token_to_id(EOS_TOKEN))]
    )):
        other = Tokenizer.from_file(str(tokenizer_path))
        other.post_processor = post_processor
        assert JanusTokenizer(other).encode(prompt) == with_template.encode(prompt)


def test_decode_skips_special_tokens(tokenizer):
    ids = tokenizer.encode(f"{USER_TOKEN}: Is there a red star?{EOS_TOKEN}")
    assert tokenizer.decode(ids) == ": Is there a red star?"
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        f"{BOS_TOKEN}{USER_TOKEN}: Is there a red star?{EOS_TOKEN}"
    )
    assert tokenizer.decode(torch.tensor(ids)) == tokenizer.decode(ids)
    assert tokenizer.decode(tokenizer.encode(MULTIBYTE_TEXT)) == MULTIBYTE_TEXT


def test_from_file_errors_are_one_line_and_name_the_file(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(ValueError, match="not found") as error:
        JanusTokenizer.from_file(missing)
    assert str(missing) in str(error.value)

    for name, content in [("empty.json", b""), ("garbage.json", b"\xff\x00not json"), ("wrong.json", b"[1, 2]")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError) as error:
            JanusTokenizer.from_file(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)

    with pytest.raises(ValueError, match="not found"):
        JanusTokenizer.from_file(tmp_path)  # a directory without tokenizer.json


def test_save_round_trip(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    tokenizer.save(tmp_path / "copy.json")
    for path in (tmp_path, tmp_path / "copy.json"):
        reloaded = JanusTokenizer.from_file(path)
        assert reloaded.encode(MULTIBYTE_TEXT) == tokenizer.encode(MULTIBYTE_TEXT)
        assert reloaded.pad_id == tokenizer.pad_id


def test_stream_decoding_matches_full_decode(tokenizer):
    ids = tokenizer.encode(MULTIBYTE_TEXT + EOS_TOKEN)
    # The test is only meaningful if some tokens carry part of a character.
    assert any("\ufffd" in tokenizer.decode([token_id]) for token_id in ids)

    pieces = list(tokenizer.decode_stream(ids))
    assert "".join(pieces) == tokenizer.decode(ids) == MULTIBYTE_TEXT
    assert all(pieces) and not any("\ufffd" in piece for piece in pieces)

    raw = tokenizer.decode_stream(ids, skip_special_tokens=False)
    assert "".join(raw) == tokenizer.decode(ids, skip_special_tokens=False)


def test_stream_decoder_holds_back_partial_characters(tokenizer):
    ids = tokenizer.encode("😀", add_bos=False)
    assert len(ids) > 1  # byte-level: the emoji's 4 bytes span several tokens
    decoder = tokenizer.stream_decoder()
    assert [decoder.push(token_id) for token_id in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]) == "😀"
    assert decoder.push(tokenizer.encode(" yes", add_bos=False)) == " yes"
    assert decoder.flush() == ""

    unfinished = tokenizer.stream_decoder()
    assert unfinished.push(ids[:-1]) == ""
    assert unfinished.flush() == tokenizer.decode(ids[:-1])  # replacement character(s), not lost


# --------------------------------------------------------------------------- HF tokenizer oracle


def test_hf_tokenizer_wrapper_agrees(tmp_path, tokenizer):
    pytest.importorskip("transformers")
    hf = build_hf_tokenizer(tmp_path)
    assert (hf.image_token, hf.boi_token, hf.eoi_token) == (IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    )
    conversation = [{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat color is the {MULTIBYTE_TEXT}?"}]
    prompts = [render_conversation(conversation, PRO), image_generation_prompt("a blue star", PRO)]
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        assert hf(prompt).input_ids == ids
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)
    assert hf.convert_tokens_to_ids(ASSISTANT_TOKEN) == tokenizer.token_to_id(ASSISTANT_TOKEN)


# --------------------------------------------------------------------------- chat format


def test_chat_format_for():
    assert (PRO.user_role, PRO.assistant_role) == ("<|User|>", "<|Assistant|>")
    assert (OLD.user_role, OLD.assistant_role) == ("User", "Assistant")
    with pytest.raises(ValueError, match="llama"):
        chat_format_for("llama")


def test_default_system_prompt_is_official():
    assert DEFAULT_SYSTEM_PROMPT == (
        "You are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using natural language."
    )


def test_understanding_prompt_pro():
    messages = [{"role": "user", "content": "<image_placeholder>\nDescribe."}, {"role": "assistant", "content": ""}]
    expected = f"{DEFAULT_SYSTEM_PROMPT}\n\n<|User|>: <image_placeholder>\nDescribe.\n\n<|Assistant|>:"
    assert render_conversation(messages, PRO) == expected
    assert render_conversation(messages[:1], PRO) == expected  # the empty assistant turn is implied


def test_multi_turn_prompt_pro():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "<image_placeholder>\nWhat?"},
        {"role": "assistant", "content": ""},
    ]
    assert render_conversation(messages, PRO) == (
        f"{DEFAULT_SYSTEM_PROMPT}\n\n<|User|>: Hi\n\n<|Assistant|>: Hello.<｜end▁of▁sentence｜>"
        "<|User|>: <image_placeholder>\nWhat?\n\n<|Assistant|>:"
    )


def test_generation_prompts():
    assert image_generation_prompt("A cat", PRO) == "<|User|>: A cat\n\n<|Assistant|>:<begin_of_image>"
    assert image_generation_prompt("A cat", OLD) == "User: A cat\n\nAssistant:<begin_of_image>"
    assert image_generation_prompt("  A cat \n", OLD) == "User: A cat\n\nAssistant:<begin_of_image>"
    with pytest.raises(ValueError, match="empty"):
        image_generation_prompt("   ", PRO)


def test_system_prompt_handling():
    user = {"role": "user", "content": "  Is it red? \n"}
    assert render_conversation([user], OLD, system_prompt="") == "User: Is it red?\n\nAssistant:"
    assert render_conversation([user], OLD, system_prompt="Be brief.") == (
        "Be brief.\n\nUser: Is it red?\n\nAssistant:"
    )
    overridden = [{"role": "system", "content": "Answer yes or no."}, user]
    assert render_conversation(overridden, OLD) == "Answer yes or no.\n\nUser: Is it red?\n\nAssistant:"
    emptied = [{"role": "system", "content": ""}, user]
    assert render_conversation(emptied, OLD) == "User: Is it red?\n\nAssistant:"


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], ValueError),
        ([{"role": "system", "content": "x"}], ValueError),
        ([{"role": "assistant", "content": "x"}], ValueError),
        ([{"role": "User", "content": "x"}], ValueError),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], ValueError),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], ValueError),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "done"}], ValueError),
        ([{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
         ValueError),
        ([{"role": "user", "content": 3}], TypeError),
        ([{"content": "no role"}], TypeError),
        ("user: hi", TypeError),
    ],
)
def test_render_conversation_rejects_bad_conversations(messages, error):
    with pytest.raises(error):
        render_conversation(messages, PRO)


# --------------------------------------------------------------------------- image loading


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` RGB pixels but carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_load_image_sources(tmp_path):
    image = _noise(7, 5)
    path = tmp_path / "noise.png"
    image.save(path)
    expected = np.asarray(image)
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), io.BytesIO(path.read_bytes()),
                   image):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (7, 5)
        np.testing.assert_array_equal(np.asarray(loaded), expected)
    assert load_image(image) is not image  # a copy: the caller's image is never modified
    with pytest.raises(TypeError):
        load_image(42)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_load_image_converts_modes_to_rgb(mode):
    image = _noise(6, 4).convert(mode)
    loaded = load_image(image)
    assert loaded.mode == "RGB" and loaded.size == (6, 4)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image.convert("RGB")))


def test_load_image_drops_alpha_like_the_official_loader():
    transparent_red = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert load_image(_png_bytes(transparent_red)).getpixel((0, 0)) == (255, 0, 0)


def test_load_image_one_pixel():
    loaded = load_image(_png_bytes(Image.new("RGB", (1, 1), (10, 20, 30))))
    assert loaded.size == (1, 1) and loaded.getpixel((0, 0)) == (10, 20, 30)


def test_load_image_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path)  # a directory
    text = tmp_path / "notes.png"
    text.write_text("hello, not an image")
    with pytest.raises(ValueError, match="not a recognised image"):
        load_image(text)
    with pytest.raises(ValueError, match="not a recognised image"):
        load_image(b"GIF87a? no, just bytes")
    with pytest.raises(ValueError, match="not a recognised image"):
        load_image(b"")
    truncated = _png_bytes(_noise(64, 64))[:200]
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(truncated)
    with pytest.raises(ValueError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


def test_load_image_rejects_decompression_bombs(monkeypatch, tmp_path):
    over_error_limit = _png_bytes(_noise(20, 20))  # 400 pixels > 2 * 100: Pillow raises
    over_warning_limit = _png_bytes(_noise(12, 12))  # 144 pixels > 100: Pillow only warns
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for data in (over_error_limit, over_warning_limit):
        with pytest.raises(ValueError, match="too large"):
            load_image(data)
    path = tmp_path / "bomb.png"
    path.write_bytes(over_warning_limit)
    with pytest.raises(ValueError, match="too large") as error:
        load_image(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert load_image(_png_bytes(_noise(10, 10))).size == (10, 10)  # at the limit: fine


def test_huge_declared_size_is_rejected_before_allocation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="too large"):
        load_image(_png_header_only(50000, 50000))  # would be 7.5 GB of RGB pixels
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 100 * 1024


# --------------------------------------------------------------------------- preprocessing


BACKGROUND = (127 / 255 - 0.5) / 0.5


def test_preprocess_shape_range_and_padding():
    image = Image.new("RGB", (40, 20), (255, 0, 0))  # landscape: padded above and below
    pixels = preprocess_image(image, 32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    # Content is 32 x 16 at rows 8..23; everything else is the 127 background.
    np.testing.assert_allclose(pixels[:, :8], BACKGROUND, atol=1e-7)
    np.testing.assert_allclose(pixels[:, 24:], BACKGROUND, atol=1e-7)
    np.testing.assert_allclose(pixels[0, 8:24], 1.0, atol=1e-6)
    np.testing.assert_allclose(pixels[1:, 8:24], -1.0, atol=1e-6)


def test_preprocess_portrait_pads_left_and_right():
    pixels = preprocess_image(Image.new("RGB", (20, 40), (0, 0, 255)), 80)
    np.testing.assert_allclose(pixels[:, :, :20], BACKGROUND, atol=1e-7)
    np.testing.assert_allclose(pixels[2, :, 20:60], 1.0, atol=1e-6)
    np.testing.assert_allclose(pixels[:2, :, 20:60], -1.0, atol=1e-6)
    np.testing.assert_allclose(pixels[:, :, 60:], BACKGROUND, atol=1e-7)


def test_preprocess_truncates_short_side_like_the_official_code():
    # 5 x 2 at 384: 2 / 5 * 384 = 153.6 -> 153 rows (transformers' port rounds to 154).
    pixels = preprocess_image(Image.new("RGB", (5, 2), (255, 255, 255)), 384)
    content_rows = (pixels[0, :, 0] > 0.5).nonzero().flatten()
    assert content_rows.tolist() == list(range((384 - 153) // 2, (384 - 153) // 2 + 153))


def test_preprocess_min_size_and_one_pixel():
    thin = preprocess_image(Image.new("RGB", (1000, 1), (255, 255, 255)), 384)
    assert int((thin[0, :, 0] > 0.5).sum()) == 14  # the official floor of 14 pixels
    single = preprocess_image(Image.new("RGB", (1, 1), (255, 255, 255)), 64)
    np.testing.assert_allclose(single, 1.0, atol=1e-6)  # 1x1 scaled up to fill the square


def test_preprocess_images_batches():
    images = [_noise(30, 20, seed) for seed in range(3)]
    batch = preprocess_images(images, 24)
    assert batch.shape == (3, 3, 24, 24)
    torch.testing.assert_close(batch[1], preprocess_image(images[1], 24))
    assert preprocess_images([], 24).shape == (0, 3, 24, 24)
    with pytest.raises(ValueError):
        preprocess_image(images[0], 0)


@pytest.mark.parametrize("image_size", [384, 64])
@pytest.mark.parametrize("size", [(400, 300), (150, 200), (400, 10), (64, 64)])
def test_preprocess_matches_transformers(image_size, size):
    transformers = pytest.importorskip("transformers")
    # The PIL backend is the one that resizes exactly as the official code (PIL bicubic);
    # `JanusImageProcessor` itself falls back to it when torchvision is absent.
    processor_class = getattr(transformers, "JanusImageProcessorPil", None) or transformers.JanusImageProcessor
    processor = processor_class(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],  # background = int(0.5 * 255) = 127
        image_std=[0.5, 0.5, 0.5],
        do_normalize=True,
    )
    assert tuple(processor.background_color) == (127, 127, 127)
    # These sizes give the same short side under HF's round() and the official int().
    image = _noise(*size, seed=image_size)
    expected = torch.as_tensor(np.asarray(processor(image, return_tensors="np")["pixel_values"][0]))
    torch.testing.assert_close(preprocess_image(image, image_size), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- pixel output


def test_tensor_to_pil_truncates_like_the_official_scripts():
    values = torch.tensor([-1.5, -1.0, 0.0, 2 * 127.9 / 255 - 1, 0.999, 1.0, 3.0, float("nan")])
    pixels = values.view(1, 1, 1, -1).expand(2, 3, 4, -1)
    images = tensor_to_pil(pixels)
    assert len(images) == 2 and images[0].mode == "RGB" and images[0].size == (8, 4)
    row = np.asarray(images[1])[3, :, 0]
    expected = np.clip((values.numpy() + 1) / 2 * 255, 0, 255)
    assert row.tolist()[:7] == expected[:7].astype(np.uint8).tolist()
    assert row.tolist() == [0, 0, 127, 127, 254, 255, 255, 0]
    assert tensor_to_pil(pixels.to(torch.bfloat16))[0].size == (8, 4)


def test_tensor_to_pil_rejects_bad_shapes():
    for bad in (torch.zeros(3, 4, 4), torch.zeros(1, 1, 4, 4), np.zeros((1, 3, 4, 4))):
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
            tensor_to_pil(bad)
