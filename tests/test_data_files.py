"""User data files: LLaVA-style JSON arrays and JSON Lines, several images per conversation, an image root,
every record checked before training (file and line named), and --skip-bad."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

from openjanus.config import ConfigError
from openjanus.data import DataError, JsonlDataset, encode_conversation, scan_data_file
from openjanus.processing.chat import chat_format_for
from openjanus.processing.tokenizer import JanusTokenizer
from openjanus.train import run
from openjanus.train.cli import register

TINY = Path(__file__).parent.parent / "configs" / "test-tiny.yaml"
COLORS = {"red.png": (200, 10, 10), "blue.png": (10, 10, 200)}


def images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, color in COLORS.items():
        Image.new("RGB", (40, 30), color).save(folder / name)
    return folder


def chat(question: str, answer: str = "yes", **images) -> dict:
    return {**images, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_llava_json_array_with_several_images_per_conversation(tmp_path, tokenizer_file):
    images(tmp_path / "pictures")
    two_turns = {"images": ["pictures/red.png", "pictures/blue.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat color is this?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And this one? <image>"}, {"from": "gpt", "value": "blue"}]}
    records = [two_turns, chat("<image>\nWhat color?", "red", image="pictures/red.png"), chat("Hello?", "hi")]
    path = tmp_path / "llava.json"
    text = json.dumps(records, indent=2)
    path.write_text(text)
    index = scan_data_file(path, "understanding")
    starts = [match.start() for match in re.finditer(r"^  \{", text, re.MULTILINE)]
    assert index.lines.tolist() == [text.count("\n", 0, start) + 1 for start in starts]  # each record's first line
    data = JsonlDataset(path, seed=0, kind="understanding")
    examples = sorted((data[i] for i in range(3)), key=lambda e: -len(e.images))
    assert [len(e.images) for e in examples] == [2, 1, 0]
    assert [e.images[0].getpixel((0, 0)) for e in examples[:2]] == [COLORS["red.png"], COLORS["red.png"]]
    assert examples[0].images[1].getpixel((0, 0)) == COLORS["blue.png"]

    tokenizer = JanusTokenizer.from_file(tokenizer_file)
    sample = encode_conversation(tokenizer, chat_format_for("deepseek"), examples[0], image_tokens=4)
    first_answer = next(t for t, target in enumerate(sample.targets) if target != -100)
    # One image block per turn, in order: the second image is not shown before the first answer.
    assert sample.ids[:first_answer + 1].count(tokenizer.image_id) == 4 and sample.ids.count(tokenizer.image_id) == 8
    assert sample.kind == "understanding" and len(sample.images) == 2


def test_images_start_at_the_image_root(tmp_path):
    images(tmp_path / "elsewhere")
    (tmp_path / "data").mkdir()
    path = write_lines(tmp_path / "data" / "pairs.jsonl", [{"file_name": "red.png", "text": "a red picture"}])
    with pytest.raises(DataError, match=re.escape(f"{path} line 1: image not found: {path.parent / 'red.png'}")):
        scan_data_file(path, "generation")
    example = JsonlDataset(path, kind="generation", image_root=tmp_path / "elsewhere")[0]
    assert example.prompt == "a red picture" and example.image.getpixel((0, 0)) == COLORS["red.png"]
    absolute = write_lines(tmp_path / "abs.jsonl", [{"image": str(tmp_path / "elsewhere" / "blue.png"),
                                                     "caption": "blue"}])
    assert JsonlDataset(absolute, kind="generation")[0].prompt == "blue"
    with pytest.raises(DataError, match="image root not found"):
        scan_data_file(path, image_root=tmp_path / "nowhere")


BAD_RECORDS = {
    "malformed": ('{"text": "no closing brace"', r"malformed JSON"),
    "missing image": (chat("<image>\nWhat?", image="nope.png"), r"image not found: .*nope\.png"),
    "unreadable image": (chat("<image>\nWhat?", image="broken.png"), r"unreadable image .*broken\.png"),
    "truncated image": (chat("<image>\nWhat?", image="truncated.png"), r"unreadable image .*truncated\.png"),
    "too few markers": (chat("<image>\nWhat?", images=["red.png", "blue.png"]),
                        r"1 <image> marker\(s\) for 2 image\(s\)"),
    "marker without image": (chat("What is <image>?"), r"1 <image> marker\(s\) for 0 image\(s\)"),
    "no answer": ({"conversations": [{"from": "human", "value": "hi"}]}, "a conversation must end with an assistant"),
    "unknown role": ({"conversations": [{"from": "bot", "value": "hi"}]}, r"conversations\[0\] must be"),
    "wrong kind": ({"file_name": "red.png", "text": "red"},
                   "understanding data needs a conversation per record, got an image-text pair"),
    "not an object": ([1, 2], "a record must be a JSON object"),
}


def bad_data(folder: Path) -> Path:
    images(folder)
    (folder / "broken.png").write_bytes(b"this is not a PNG")
    png = (folder / "red.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[:len(png) // 2])
    return folder


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_a_bad_record_is_named_with_its_file_and_line(tmp_path, case):
    bad_data(tmp_path)
    record, message = BAD_RECORDS[case]
    path = write_lines(tmp_path / "data.jsonl", [chat("<image>\nWhat color?", image="red.png"), "", record])
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: ") + message):  # the blank line counts
        scan_data_file(path, "understanding")


def test_a_malformed_json_array_is_named_with_its_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "fine"},\n  {"text": "broken",,}\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: malformed JSON")):
        scan_data_file(path, "text")


def test_skip_bad_keeps_the_good_records_and_reports_the_bad_ones(tmp_path):
    bad_data(tmp_path)
    good = [chat("<image>\nWhat color?", "red", image="red.png"), chat("Hello?", "hi")]
    bad = [BAD_RECORDS[case][0] for case in ("missing image", "malformed", "too few markers", "no answer")]
    path = write_lines(tmp_path / "data.jsonl", [bad[0], good[0], bad[1], bad[2], good[1], bad[3]])
    with pytest.raises(DataError, match=r"line 1: image not found: .* \(4 bad records in all\); .*--skip-bad"):
        scan_data_file(path, "understanding")
    index = scan_data_file(path, "understanding", skip_bad=True)
    assert index.lines.tolist() == [2, 5] and [b.line for b in index.bad] == [1, 3, 4, 6]
    summary = index.skipped_summary()
    assert f"{path}: skipped 4 bad record(s) of 6 (line 1: image not found" in summary
    assert "; line 3: malformed JSON" in summary and summary.endswith("; and 1 more)")
    data = JsonlDataset(path, seed=3, kind="understanding", skip_bad=True)
    assert len(data) == 2 and sorted(len(data[i].images) for i in range(4)) == [0, 0, 1, 1]  # two passes


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:  # a second command, so that typer keeps `train` as a subcommand
        """Nothing."""

    return app


def test_train_refuses_bad_data_in_one_line_and_skip_bad_trains_on_the_rest(tmp_path, tiny_model_dir,
                                                                             tokenizer_file):
    bad_data(tmp_path)
    path = write_lines(tmp_path / "data.jsonl", [chat("<image>\nWhat color?", "red", image="red.png"),
                                                 BAD_RECORDS["missing image"][0],
                                                 chat("<image>\nAnd here?", "blue", image="blue.png")])
    tiny = yaml.safe_load(TINY.read_text())
    stage = {"name": "mine", "task": "janus", "steps": 2, "batch_size": 2,
             "model": {"init": str(tiny_model_dir), "train": ["aligner"]},
             "data": {"ratios": {"understanding": 1}, "files": {"understanding": str(path)}, "eval_batches": 0}}
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({"name": "mine", "tokenizer": {"file": str(tokenizer_file)},
                                      "runtime": tiny["runtime"], "stages": [stage]}))
    runner = CliRunner()
    result = runner.invoke(cli(), ["train", str(config), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: stage mine: {path} line 2: image not found: {tmp_path / 'nope.png'}; fix the data or skip bad "
        "records with --skip-bad (data.skip_bad)"]
    assert not (tmp_path / "run").exists()

    result = runner.invoke(cli(), ["train", str(config), "--run-dir", str(tmp_path / "run"), "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert f"stage mine: {path}: skipped 1 bad record(s) of 3 (line 2: image not found" in result.output
    lines = [json.loads(line) for line in (tmp_path / "run" / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(m["loss_understanding"] > 0 for m in lines)

    stage["data"]["skip_bad"] = True  # the config key does what the flag does, and the run stays resumable
    config.write_text(yaml.safe_dump({"name": "mine", "tokenizer": {"file": str(tokenizer_file)},
                                      "runtime": tiny["runtime"], "stages": [stage]}))
    reports = []
    run(config, run_dir=tmp_path / "run", echo=reports.append)
    assert "skipped 1 bad record(s) of 3" in reports[0] and "done (2/2 steps), skipping" in reports[1]


def test_a_missing_data_file_is_a_config_error(tmp_path):
    tiny = yaml.safe_load(TINY.read_text())
    tiny["stages"][4]["data"]["files"] = {"understanding": str(tmp_path / "nope.json")}
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump(tiny))
    with pytest.raises(ConfigError, match=r"stage stage2: data file not found: .*nope\.json"):
        run(config, run_dir=tmp_path / "run", dry_run=True)
