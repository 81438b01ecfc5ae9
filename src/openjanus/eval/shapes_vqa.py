"""Shapes-VQA: one-word questions about held-out ShapesWorld scenes, answered greedily and scored exactly.

Spec: shared/spec/shapes-world.md, section 5. Accuracy per question family, ``overall`` as the mean
of families, and the share of "yes" answers for the yes/no families (a model that always says yes
scores the share of yes questions there). ``answered`` tallies, for the families with word answers,
which answer each expected answer got (a confusion table: which shapes, colours or counts it mixes up).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..worlds import shapes
from .common import check_positive, chunks, counts, mean_scores, shapes_image_size, weight_format, write_json
from .grids import Cell, labelled_grid

REPORT_FILE = "shapes_vqa.json"
GRID_FILE = "shapes_vqa_samples.png"
GRID_QUESTIONS_PER_FAMILY = 4
YES_NO_FAMILIES = ("exists", "relation")


def shapes_vqa(pipe: Any, n_per_family: int = 100, batch_size: int = 16, max_new_tokens: int = 8,
               out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Ask the held-out shapes-VQA questions greedily and report accuracy per family, overall and yes-ratios."""
    size = shapes_image_size(pipe)
    check_positive(n_per_family=n_per_family, batch_size=batch_size, max_new_tokens=max_new_tokens)
    started = time.perf_counter()
    pairs = shapes.test_questions(n_per_family, size=size)
    shown = {f * n_per_family + j for f in range(len(shapes.QUESTION_FAMILIES))
             for j in range(min(GRID_QUESTIONS_PER_FAMILY, n_per_family))}

    answers: list[str] = []
    cells: dict[str, list[Cell]] = {}
    for chunk in tqdm(chunks(len(pairs), batch_size), desc="shapes-vqa", unit="batch", disable=not progress):
        images = {i: shapes.render(pairs[i][0]) for i in chunk}
        conversations = [[{"role": "user", "content": pairs[i][1].text, "images": [images[i]]}] for i in chunk]
        answers += pipe.answer(conversations, max_new_tokens=max_new_tokens, temperature=0.0)
        for i in chunk:
            if i in shown:
                question = pairs[i][1]
                ok = shapes.score_answer(answers[i], question.answer)
                caption = f"{question.text}\nanswer: {answers[i].strip() or '(empty)'}\nexpected: {question.answer}"
                cells.setdefault(question.family, []).append(Cell(images[i], caption, ok))
    answer_s = time.perf_counter() - started

    questions = [question for _, question in pairs]
    families = [q.family for q in questions]
    correct = [shapes.score_answer(a, q.answer) for a, q in zip(answers, questions)]
    report: dict[str, Any] = {
        "benchmark": "shapes-vqa",
        "scores": mean_scores(families, correct, shapes.QUESTION_FAMILIES),
        "counts": counts(families, correct, shapes.QUESTION_FAMILIES),
        "yes_ratio": _yes_ratio([a for a, f in zip(answers, families) if f in YES_NO_FAMILIES],
                                [f for f in families if f in YES_NO_FAMILIES]),
        "expected_yes_ratio": _yes_ratio([q.answer for q in questions if q.family in YES_NO_FAMILIES],
                                         [f for f in families if f in YES_NO_FAMILIES]),
    }
    report["overall"] = report["scores"]["overall"]
    report["answered"] = _answered(questions, answers)
    report["settings"] = {
        "n_per_family": n_per_family, "questions": len(pairs), "batch_size": batch_size,
        "max_new_tokens": max_new_tokens, "temperature": 0.0, "image_size": size, "question_split": "test",
        "question_seed": shapes.SPLIT_SEEDS["test"], "device": str(pipe.device),
        "weights": weight_format(pipe),
    }
    report["timing"] = {
        "answer_s": round(answer_s, 3), "total_s": round(time.perf_counter() - started, 3),
        "questions_per_s": round(len(pairs) / answer_s, 3) if answer_s > 0 else None,
    }
    report["per_question"] = [{"family": q.family, "question": q.text, "expected": q.answer, "answer": a, "correct": ok}
                              for q, a, ok in zip(questions, answers, correct)]
    if out_dir is not None:
        out = Path(out_dir)
        rows = [(family, cells[family]) for family in shapes.QUESTION_FAMILIES if family in cells]
        out.mkdir(parents=True, exist_ok=True)
        title = f"shapes-vqa, greedy: overall {report['overall']:.3f}. Green frame: correct, red: wrong."
        labelled_grid(rows, tile=min(size, 160), label_width=90, title=title).save(out / GRID_FILE)
        report["files"] = {"report": str(out / REPORT_FILE), "grid": str(out / GRID_FILE)}
        write_json(out / REPORT_FILE, report)
    return report


def _answered(questions: list[shapes.Question], answers: list[str]) -> dict[str, dict[str, dict[str, int]]]:
    """Per family with word answers: expected answer -> {answer's first word: count} ("" for no answer)."""
    tally: dict[str, dict[str, dict[str, int]]] = {}
    for question, answer in zip(questions, answers):
        if question.family in YES_NO_FAMILIES:
            continue
        row = tally.setdefault(question.family, {}).setdefault(question.answer, {})
        word = shapes.answer_word(answer)
        row[word] = row.get(word, 0) + 1
    return {family: {expected: dict(sorted(row.items())) for expected, row in sorted(rows.items())}
            for family, rows in tally.items()}


def _yes_ratio(answers: list[str], families: list[str]) -> dict[str, float]:
    """Share of answers whose first word is "yes", per yes/no family."""
    return mean_scores(families, [shapes.score_answer(a, "yes") for a in answers], YES_NO_FAMILIES)
