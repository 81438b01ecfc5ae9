"""Labelled PNG grids of evaluation samples: a text label per row, framed tiles with optional captions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

PAPER = (255, 255, 255)
INK = (20, 20, 20)
RIGHT = (0, 150, 70)  # frame of a correct sample
WRONG = (210, 0, 90)  # frame of a wrong sample
UNSCORED = (200, 200, 200)
FRAME = 3
PAD = 8
LINE_GAP = 3


@dataclass
class Cell:
    """One tile: an image, an optional caption under it, and whether it was scored correct (None: unscored)."""

    image: Image.Image
    caption: str = ""
    correct: bool | None = None


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return bottom - top + LINE_GAP


def wrap(text: str, width: int, font) -> list[str]:
    """Greedy word wrap of ``text`` (newlines kept) to lines at most ``width`` pixels wide."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def labelled_grid(rows: Sequence[tuple[str, Sequence[Cell]]], tile: int = 128, label_width: int = 240,
                  font_size: int = 13, title: str = "") -> Image.Image:
    """A grid image: an optional title line, then per row its label on the left and its cells as framed tiles."""
    font = _font(font_size)
    line = _line_height(font)
    columns = max((len(cells) for _, cells in rows), default=0)
    cell_width = tile + 2 * FRAME
    caption_lines = max((len(wrap(c.caption, cell_width, font)) for _, cells in rows for c in cells if c.caption),
                        default=0)
    row_heights = [max(cell_width + caption_lines * line, len(wrap(label, label_width, font)) * line) + PAD
                   for label, _ in rows]
    width = PAD + label_width + PAD + columns * (cell_width + PAD)
    title_lines = wrap(title, width - 2 * PAD, font) if title else []
    canvas = Image.new("RGB", (width, PAD + len(title_lines) * line + sum(row_heights)), PAPER)
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(title_lines):
        draw.text((PAD, PAD + k * line), text, fill=INK, font=font)
    y = PAD + len(title_lines) * line
    for (label, cells), height in zip(rows, row_heights):
        for k, text in enumerate(wrap(label, label_width, font)):
            draw.text((PAD, y + k * line), text, fill=INK, font=font)
        x = PAD + label_width + PAD
        for cell in cells:
            frame = UNSCORED if cell.correct is None else RIGHT if cell.correct else WRONG
            draw.rectangle((x, y, x + cell_width - 1, y + cell_width - 1), fill=frame)
            canvas.paste(_fit(cell.image, tile), (x + FRAME, y + FRAME))
            for k, text in enumerate(wrap(cell.caption, cell_width, font) if cell.caption else []):
                draw.text((x, y + cell_width + 2 + k * line), text, fill=INK, font=font)
            x += cell_width + PAD
        y += height
    return canvas


def _fit(image: Image.Image, tile: int) -> Image.Image:
    image = image.convert("RGB")
    if image.size == (tile, tile):
        return image
    resample = Image.Resampling.LANCZOS if image.width > tile else Image.Resampling.NEAREST
    return image.resize((tile, tile), resample)
