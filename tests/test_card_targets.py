"""The targets a continued release's card states (vdsr.model_card.continuation_targets), against
cells written out by hand from shared/reference/paper_tables.md."""

from __future__ import annotations

import copy

from vdsr import model_card, paper

SCALES = ("x2", "x3", "x4")


def _table(values: dict[str, tuple[float, float, float]]) -> dict:
    return {d: {s: {"psnr": v, "ssim": 0.9} for s, v in zip(SCALES, row)} for d, row in values.items()}


PREVIOUS = _table({"Set5": (37.35, 33.41, 31.11), "Set14": (32.90, 29.71, 27.88), "B100": (31.79, 28.73, 27.19)})


def _reached(scores: dict) -> list[bool]:
    return [not short for _, short in model_card.continuation_targets(scores, PREVIOUS)]


def test_equal_to_the_previous_release_is_not_above_the_gpu_reimplementations() -> None:
    scores = {"model": copy.deepcopy(PREVIOUS)}
    (_, must), (_, goal), (_, plus) = model_card.continuation_targets(scores, PREVIOUS)
    # Set5 37.35 / 33.41 / 31.11 is below caffe-vdsr's 37.46 / 33.52 / 31.14 at every scale
    assert must == ["Set5 x2 37.35 vs 37.46", "Set5 x3 33.41 vs 33.52", "Set5 x4 31.11 vs 31.14"]
    assert "Urban100 x2 - vs 30.76" in goal and len(goal) == 12  # all 12 below the paper (or missing)
    assert len(plus) == 9 and all(" - vs " in cell for cell in plus)  # no self-ensemble measured


def test_must_needs_every_cell_and_strictly_above_the_best_gpu_number() -> None:
    scores = {"model": _table({"Set5": (37.47, 33.53, 31.15), "Set14": (32.90, 29.71, 27.88),
                               "B100": (31.79, 28.73, 27.19)})}
    assert _reached(scores)[0]
    scores["model"]["Set14"]["x3"]["psnr"] = 29.704  # rounds to 29.70 < 29.71
    assert not _reached(scores)[0]
    scores["model"]["Set14"]["x3"]["psnr"] = 29.706  # rounds to 29.71: at the previous release
    assert _reached(scores)[0]
    scores["model"]["Set5"]["x4"]["psnr"] = 31.14  # equal to caffe-vdsr: not above
    assert not _reached(scores)[0]


def test_goal_is_the_paper_in_all_twelve_cells_and_moonshot_is_twtygqyy_for_the_ensemble() -> None:
    everything = {d: tuple(paper.TABLE3[d][s]["vdsr"][0] for s in SCALES) for d in paper.TABLE3}
    scores = {"model": _table(everything),
              "self_ensemble": _table({"Set5": (37.59, 33.75, 31.43), "Set14": (33.04, 29.84, 28.08),
                                       "B100": (31.91, 28.85, 27.29)})}
    assert _reached(scores)[1:] == [True, True]
    scores["self_ensemble"]["B100"]["x4"]["psnr"] = 27.28
    assert _reached(scores)[1:] == [True, False]
    del scores["model"]["Urban100"]
    assert _reached(scores)[1:] == [False, False]


def test_the_card_text_names_the_cells_that_miss() -> None:
    text = model_card.targets_text({"model": copy.deepcopy(PREVIOUS)}, {}, PREVIOUS, ("Set5", "Set14", "B100", "Urban100"))
    assert "- must, every cell of Set5, Set14, B100 at or above the release it continues" in text
    assert "**not reached** (short: Set5 x2 37.35 vs 37.46; Set5 x3 33.41 vs 33.52; Set5 x4 31.11 vs 31.14)" in text
    assert "(Urban100 not evaluated for this release)" in text


def test_an_srcnn_release_is_held_to_the_papers_srcnn_on_set5() -> None:
    # the paper's SRCNN on Set5: 36.66 / 32.75 / 30.48; the must is 0.3 dB below: 36.36 / 32.45 / 30.18
    scores = {"model": _table({"Set5": (36.36, 32.50, 30.20), "Set14": (32.0, 28.9, 27.2)})}
    (must_text, must), (goal_text, goal) = model_card.srcnn_targets(scores)
    assert "(36.36 / 32.45 / 30.18)" in must_text and "(36.66 / 32.75 / 30.48)" in goal_text
    assert must == [] and goal == ["Set5 x2 36.36 vs 36.66", "Set5 x3 32.50 vs 32.75", "Set5 x4 30.20 vs 30.48"]
    scores["model"]["Set5"]["x4"]["psnr"] = 30.174  # rounds to 30.17 < 30.18
    assert model_card.srcnn_targets(scores)[0][1] == ["Set5 x4 30.17 vs 30.18"]
    text = model_card.targets_text(scores, {}, None, ("Set5", "Set14", "B100"), "srcnn")
    assert "Targets of the SRCNN release (B100 not evaluated for this release)" in text
    assert "**not reached** (short: Set5 x4 30.17 vs 30.18)" in text and "291 images" in text
    assert "91-image VDSR" not in text
