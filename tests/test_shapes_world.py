"""ShapesWorld contract tests: rendering, relations, prompts, questions, captions, checker."""

import math
import re
import time
from collections import Counter

import numpy as np
import pytest

from openjanus.worlds import shapes as W
from openjanus.worlds.shapes import GenPrompt, Scene, ShapeObject


def _objects_of(scene: Scene) -> list[tuple[str, str]]:
    return sorted((o.color, o.shape) for o in scene.objects)


def _detected(image) -> list[tuple[str, str]]:
    return sorted((d.color, d.shape) for d in W.detect_objects(image))


# Rendering -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 100, 112, 120, 130, 144.5])
def test_render_rejects_invalid_sizes(size):
    scene = Scene(128, (ShapeObject("circle", "red", 64, 64, 16),))
    with pytest.raises(ValueError, match="multiple of 16"):
        W.render(scene, size=size)


def test_render_uses_pixel_centres_and_palette_only():
    # Half-side 10 centred on a pixel corner covers exactly a 20 x 20 block of pixel centres.
    square = ShapeObject("square", "blue", 64.0, 64.0, 10 * math.sqrt(2) + 1e-9)
    pixels = np.asarray(W.render(Scene(128, (square,))))
    assert pixels.shape == (128, 128, 3) and pixels.dtype == np.uint8
    inside = np.all(pixels == W.PALETTE["blue"], axis=2)
    assert inside.sum() == 400
    assert inside[54:74, 54:74].all()
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert colours == {W.BACKGROUND, W.PALETTE["blue"]}  # no anti-aliasing


def test_render_at_another_size_scales_the_scene():
    scene = W.sample_scene(np.random.default_rng(3), n_objects=3)
    small, large = W.render(scene), W.render(scene, size=256)
    assert small.size == (128, 128) and large.size == (256, 256)
    assert _detected(small) == _detected(large) == _objects_of(scene)


def test_render_is_fast():
    scenes = [W.sample_scene(np.random.default_rng(k), n_objects=4) for k in range(50)]
    start = time.perf_counter()
    for scene in scenes:
        W.render(scene)
    # Spec target is well under 5 ms; the bound is loose so a busy CI machine does not flake.
    assert (time.perf_counter() - start) / len(scenes) < 0.005


# Relations -------------------------------------------------------------------------------


def test_bbox_follows_shape_geometry():
    r = 20.0
    assert W.bbox(ShapeObject("circle", "red", 50, 60, r)) == (30, 40, 70, 80)
    h = r / math.sqrt(2)
    assert W.bbox(ShapeObject("square", "red", 50, 60, r)) == pytest.approx(
        (50 - h, 60 - h, 50 + h, 60 + h)
    )
    w = r * math.sqrt(3) / 2
    assert W.bbox(ShapeObject("triangle", "red", 50, 60, r)) == pytest.approx(
        (50 - w, 40, 50 + w, 70)
    )


def test_relation_rule_examples():
    def circle(cx, cy):
        return ShapeObject("circle", "red", cx, cy, 15)

    assert W.relation(circle(30, 64), circle(90, 64)) == {"left of"}
    assert W.relation(circle(90, 64), circle(30, 64)) == {"right of"}
    assert W.relation(circle(64, 20), circle(64, 100)) == {"above"}
    assert W.relation(circle(64, 100), circle(64, 20)) == {"below"}
    # Diagonal: both components beyond 0.5.
    assert W.relation(circle(20, 20), circle(100, 100)) == {"left of", "above"}
    # Mostly horizontal with a small vertical offset: the margin removes the vertical part.
    assert W.relation(circle(20, 60), circle(100, 64)) == {"left of"}
    # Same box: offset inside the 0.1 x size margin gives no relation.
    assert W.box_relation((10, 10, 30, 30), (11, 10, 31, 30)) == set()


def test_relation_uses_box_centres_not_shape_centres():
    # A triangle's box centre lies r/4 above its circumcentre: measured from the
    # circumcentre the square would also be "above" (dy = -0.51), from the box it is not.
    triangle = ShapeObject("triangle", "red", 64, 64, 40)
    square = ShapeObject("square", "blue", 122, 20, 4 * math.sqrt(2))
    box = W.bbox(triangle)
    assert (box[1] + box[3]) / 2 == pytest.approx(54)
    assert W.relation(square, triangle) == {"right of"}


# Words and prompts -----------------------------------------------------------------------


def test_article_rule():
    assert W.with_article("orange circle") == "an orange circle"
    assert W.with_article("red square") == "a red square"
    assert W.with_article("triangle") == "a triangle"
    rng = np.random.default_rng(0)
    texts = [W.sample_prompt(rng, "colors").text for _ in range(200)]
    assert any(t.startswith("a photo of an orange ") for t in texts)
    assert not any(
        re.search(r"\ba orange\b|\ban (red|green|blue|yellow|purple)\b", t) for t in texts
    )
    scene = Scene(128, (ShapeObject("square", "orange", 64, 64, 16),))
    texts = {W.sample_question(np.random.default_rng(k), scene, "exists").text for k in range(40)}
    assert "Is there an orange square?" in texts


TEMPLATES = {
    "single_object": r"a photo of a (circle|square|triangle)",
    "two_object": r"a photo of a (\w+) and a (\w+)",
    "counting": r"a photo of (two|three|four) (circle|square|triangle)s",
    "colors": r"a photo of an? (\w+) (\w+)",
    "position": r"a photo of a (\w+) (left of|right of|above|below) a (\w+)",
    "color_attr": r"a photo of an? (\w+) (\w+) and an? (\w+) (\w+)",
}


@pytest.mark.parametrize("task", W.TASKS)
def test_prompts_follow_templates(task):
    rng = np.random.default_rng(1)
    for _ in range(50):
        prompt = W.sample_prompt(rng, task)
        assert prompt.task == task
        assert re.fullmatch(TEMPLATES[task], prompt.text), prompt.text
        shapes = prompt.spec["shapes"]
        assert len(set(shapes)) == len(shapes)
        if task == "color_attr":
            assert len(set(prompt.spec["colors"])) == 2


def test_sampling_is_deterministic_by_seed():
    def draw(seed):
        rng = np.random.default_rng(seed)
        scenes = [W.sample_scene(rng) for _ in range(5)]
        prompts = [W.sample_prompt(rng, task) for task in W.TASKS]
        prompt_scenes = [W.scene_for_prompt(rng, p) for p in prompts]
        questions = [W.questions_for_scene(rng, s) for s in scenes]
        return scenes, prompts, prompt_scenes, questions

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    scene = draw(7)[0][0]
    assert np.array_equal(np.asarray(W.render(scene)), np.asarray(W.render(scene)))


def test_split_seeds_differ_and_test_sets_are_fixed():
    assert len(set(W.SPLIT_SEEDS.values())) == 3
    prompts = W.test_prompts(20)
    assert prompts == W.test_prompts(20)
    assert len(prompts) == 20 * len(W.TASKS)
    assert [p.task for p in prompts] == [t for t in W.TASKS for _ in range(20)]
    assert prompts != W.test_prompts(20, seed=W.SPLIT_SEEDS["validation"])
    # Growing the set only appends, per task.
    assert W.test_prompts(30)[:10] == prompts[:10]

    pairs = W.test_questions(10)
    assert pairs == W.test_questions(10)
    assert Counter(q.family for _, q in pairs) == {f: 10 for f in W.QUESTION_FAMILIES}
    assert pairs != W.test_questions(10, seed=W.SPLIT_SEEDS["train"])


# Scenes ----------------------------------------------------------------------------------


def _check_placement(scene: Scene) -> None:
    size = scene.size
    assert 1 <= len(scene.objects) <= 4
    for o in scene.objects:
        assert 0.10 * size <= o.r <= 0.16 * size
        for c in (o.cx, o.cy):
            assert o.r + 0.02 * size <= c <= size - o.r - 0.02 * size
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1 :]:
            assert math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.r + b.r + 0.04 * size


def test_sample_scene_follows_placement_rules():
    rng = np.random.default_rng(11)
    counts = Counter()
    for _ in range(200):
        scene = W.sample_scene(rng)
        _check_placement(scene)
        counts[len(scene.objects)] += 1
    assert set(counts) == {1, 2, 3, 4}
    assert len(W.sample_scene(rng, size=256, n_objects=4).objects) == 4
    with pytest.raises(ValueError):
        W.sample_scene(rng, n_objects=5)


@pytest.mark.parametrize("task", W.TASKS)
def test_scene_for_prompt_satisfies_prompt(task):
    rng = np.random.default_rng(12)
    for _ in range(30):
        prompt = W.sample_prompt(rng, task)
        scene = W.scene_for_prompt(rng, prompt)
        _check_placement(scene)
        shapes = prompt.spec["shapes"]
        if task == "single_object":
            assert [o.shape for o in scene.objects] == list(shapes)
        if task == "counting":
            assert sum(o.shape == shapes[0] for o in scene.objects) == prompt.spec["count"]
        if task == "position":
            (a,) = [o for o in scene.objects if o.shape == shapes[0]]
            (b,) = [o for o in scene.objects if o.shape == shapes[1]]
            assert prompt.spec["relation"] in W.relation(a, b)


# Checker ---------------------------------------------------------------------------------


def _bfs_labels(mask: np.ndarray) -> int:
    """Reference 4-connected component count."""
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                inside = 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1]
                if inside and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
    return count


@pytest.mark.parametrize("density", [0.3, 0.55, 0.7])
def test_component_labelling_matches_bfs(density):
    mask = np.random.default_rng(5).random((40, 50)) < density
    labels, count = W._label_components(mask)
    assert count == _bfs_labels(mask)
    assert np.array_equal(labels > 0, mask)
    # Each label is one BFS component: labels and components partition pixels the same way.
    assert len(set(labels[mask].tolist())) == count


@pytest.mark.parametrize("size", [128, 256])
def test_checker_oracle_on_ground_truth_renders(size):
    rng = np.random.default_rng(13)
    per_task = 50 if size == 128 else 15
    pairs = []
    for task in W.TASKS:
        for _ in range(per_task):
            prompt = W.sample_prompt(rng, task)
            pairs.append((W.render(W.scene_for_prompt(rng, prompt, size=size)), prompt))
    scores = W.score_images(pairs)
    assert set(scores) == {*W.TASKS, "overall"}
    assert all(scores[task] >= 0.99 for task in W.TASKS), scores
    assert scores["overall"] == pytest.approx(np.mean([scores[t] for t in W.TASKS]))


def test_detect_objects_recovers_random_scenes():
    rng = np.random.default_rng(14)
    scenes = [W.sample_scene(rng) for _ in range(100)]
    exact = sum(_detected(W.render(s)) == _objects_of(s) for s in scenes)
    assert exact >= 99
    detection = W.detect_objects(np.asarray(W.render(scenes[0])))
    assert all(d.area > 0.004 * 128 * 128 for d in detection)


def test_checker_rejects_wrong_images():
    red_circle = GenPrompt(
        "colors", "a photo of a red circle", {"shapes": ("circle",), "colors": ("red",)}
    )
    blue = Scene(128, (ShapeObject("circle", "blue", 64, 64, 16),))
    red = Scene(128, (ShapeObject("circle", "red", 64, 64, 16),))
    assert not W.score_image(W.render(blue), red_circle)
    assert W.score_image(W.render(red), red_circle)

    two_squares = GenPrompt(
        "counting", "a photo of two squares", {"shapes": ("square",), "count": 2}
    )
    three = Scene(128, tuple(ShapeObject("square", "red", x, 64, 14) for x in (24, 64, 104)))
    assert not W.score_image(W.render(three), two_squares)

    left = GenPrompt(
        "position",
        "a photo of a circle left of a square",
        {"shapes": ("circle", "square"), "relation": "left of"},
    )
    right = Scene(
        128, (ShapeObject("circle", "red", 100, 64, 16), ShapeObject("square", "blue", 30, 64, 16))
    )
    assert not W.score_image(W.render(right), left)
    assert W.score_images([(W.render(right), left)]) == {"position": 0.0, "overall": 0.0}
    assert not W.score_image(np.full((128, 128, 3), 128, dtype=np.uint8), left)


# Questions -------------------------------------------------------------------------------


def _answer_from_detections(question: W.Question, objects) -> str:
    """Recompute a question's answer from detected objects, parsing only its text."""
    text = question.text
    if question.family == "count_all":
        return str(len(objects))
    if question.family == "count_shape":
        shape = re.fullmatch(r"How many (\w+)s are there\?", text).group(1)
        return str(sum(o.shape == shape for o in objects))
    if question.family == "color_of":
        shape = re.fullmatch(r"What color is the (\w+)\?", text).group(1)
        (match,) = [o for o in objects if o.shape == shape]
        return match.color
    if question.family == "shape_of":
        color = re.fullmatch(r"What shape is the (\w+) object\?", text).group(1)
        (match,) = [o for o in objects if o.color == color]
        return match.shape
    if question.family == "exists":
        color, shape = re.fullmatch(r"Is there an? (\w+) (\w+)\?", text).groups()
        return "yes" if any(o.color == color and o.shape == shape for o in objects) else "no"
    pattern = r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?"
    ca, sa, rel, cb, sb = re.fullmatch(pattern, text).groups()
    (a,) = [o for o in objects if (o.color, o.shape) == (ca, sa)]
    (b,) = [o for o in objects if (o.color, o.shape) == (cb, sb)]
    return "yes" if rel in W.box_relation(a.bbox, b.bbox) else "no"


def test_question_answers_match_detected_objects():
    rng = np.random.default_rng(15)
    checked = Counter()
    for _ in range(150):
        scene = W.sample_scene(rng)
        objects = W.detect_objects(W.render(scene))
        for question in W.questions_for_scene(rng, scene):
            assert _answer_from_detections(question, objects) == question.answer, question
            checked[question.family] += 1
    assert set(checked) == set(W.QUESTION_FAMILIES)


def test_fixed_question_set_is_balanced_and_correct():
    pairs = W.test_questions(60)
    for family in ("exists", "relation"):
        answers = Counter(q.answer for _, q in pairs if q.family == family)
        assert set(answers) == {"yes", "no"}
        assert 0.3 <= answers["yes"] / 60 <= 0.7
    for scene, question in pairs[::7]:
        objects = W.detect_objects(W.render(scene))
        assert _answer_from_detections(question, objects) == question.answer


def test_questions_respect_uniqueness():
    twins = Scene(
        128,
        (ShapeObject("circle", "red", 30, 30, 14), ShapeObject("circle", "red", 98, 98, 14)),
    )
    rng = np.random.default_rng(0)
    assert W.sample_question(rng, twins, "color_of") is None
    assert W.sample_question(rng, twins, "shape_of") is None
    assert W.sample_question(rng, twins, "relation") is None
    assert W.sample_question(rng, twins, "count_all").answer == "2"
    families = {q.family for q in W.questions_for_scene(rng, twins)}
    assert families == {"count_all", "count_shape", "exists"}
    with pytest.raises(ValueError):
        W.sample_question(rng, twins, "unknown")


def test_score_answer_uses_first_word():
    assert W.score_answer("Yes.", "yes")
    assert W.score_answer("  red, I think", "red")
    assert W.score_answer("3", "3")
    assert not W.score_answer("three", "3")
    assert not W.score_answer("no", "yes")
    assert not W.score_answer("", "yes")


# Captions --------------------------------------------------------------------------------


def test_caption_round_trip():
    rng = np.random.default_rng(16)
    for _ in range(100):
        scene = W.sample_scene(rng)
        text = W.caption(scene)
        assert text == W.caption(scene) and text.endswith(".")
        assert sorted(W.parse_caption(text)) == _objects_of(scene)


def test_caption_words():
    scene = Scene(
        128,
        (ShapeObject("square", "blue", 110, 110, 14), ShapeObject("circle", "orange", 20, 20, 14)),
    )
    assert (
        W.caption(scene) == "an orange circle at the top left, a blue square at the bottom right."
    )
    assert W.parse_caption("Two red circles and a green triangle.") == [
        ("red", "circle"),
        ("red", "circle"),
        ("green", "triangle"),
    ]
