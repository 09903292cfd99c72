"""reports/table3.md agrees with the shipped releases' eval.json (it is rewritten whenever a release
changes), and a release whose weights changed without a new publish is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import REPO_ROOT

from vdsr import paper, table3


def test_committed_table_agrees_with_the_released_evaluations() -> None:
    committed = (REPO_ROOT / table3.REPORT).read_text()
    assert committed == table3.report_text(table3.shipped_releases(REPO_ROOT)), (
        "reports/table3.md is stale: run `python -m vdsr.table3` and commit it")
    scores = json.loads((REPO_ROOT / "pretrained" / "eval.json").read_text())
    x2 = scores["model"]["Set5"]["x2"]  # an independent read of the same cell
    assert f"| Set5 | x2 | 33.66 / 0.9299 | {scores['bicubic']['Set5']['x2']['psnr']:.2f}" in committed
    assert f"{x2['psnr']:.2f} / {x2['ssim']:.4f} | {x2['psnr'] - 37.53:+.2f} |" in committed
    assert (REPO_ROOT / table3.FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_changed_weights_are_refused_and_a_self_ensemble_row_is_added(tmp_path: Path, capsys) -> None:
    (tmp_path / "pretrained").mkdir()
    for name in ("vdsr.pt", "eval.json", "MODEL_CARD.md"):
        shutil.copy(REPO_ROOT / "pretrained" / name, tmp_path / "pretrained" / name)
    scores = json.loads((tmp_path / "pretrained" / "eval.json").read_text())
    plus = {s: {x: {"psnr": v["psnr"] + 0.05, "ssim": v["ssim"]} for x, v in t.items()} for s, t in scores["model"].items()}
    (tmp_path / "pretrained" / "eval.json").write_text(json.dumps({**scores, table3.PLUS: plus}))
    assert table3.main(["--root", str(tmp_path)]) == 0
    text = (tmp_path / table3.REPORT).read_text()
    assert "vdsr+ (x8 self-ensemble) (vdsr): ours" in text
    assert f"{plus['Set5']['x2']['psnr']:.2f} / " in text

    shipped_sha256 = table3.sha256_file(tmp_path / "pretrained" / "vdsr.pt")
    with (tmp_path / "pretrained" / "vdsr.pt").open("ab") as weights:
        weights.write(b"\0")  # the weights changed, eval.json did not
    assert table3.main(["--root", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert f"eval.json was computed for weights with sha256 {shipped_sha256}" in error
    assert "publish the weights again" in error


def test_readme_results_are_the_released_ones() -> None:
    """The README's results tables show, for every set of the released eval.json, its VDSR PSNR
    beside the paper's (Table 3) and the difference: ``ours / paper (difference)``, 2 decimals; and
    in a table of their own, labelled ``<set>, VDSR+``, the x8 self-ensemble's wherever it was measured."""
    readme = (REPO_ROOT / "README.md").read_text()
    results = readme[readme.index("## Results"):readme.index("## Your first hour")]
    shipped = json.loads((REPO_ROOT / "pretrained" / "eval.json").read_text())
    scores, plus = shipped["model"], shipped.get("self_ensemble", {})
    assert set(scores) == {"Set5", "Set14", "B100", "Urban100"}
    for label, table in (("{}", scores), ("{}, VDSR+", plus)):
        for dataset, by_scale in table.items():
            ours = {x: by_scale[x]["psnr"] for x in ("x2", "x3", "x4")}
            theirs = {x: paper.TABLE3[dataset][x]["vdsr"][0] for x in ours}
            cells = " | ".join(f"{ours[x]:.2f} / {theirs[x]:.2f} ({ours[x] - theirs[x]:+.2f})" for x in ours)
            row = f"| {label.format(dataset)} | {cells} |"
            assert row in results, f"README results row {label.format(dataset)!r} disagrees with eval.json: {row}"
    rows = [line for line in results.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(scores) + (2 + len(plus) if plus else 0), rows  # header, rule, a row per set: no stale row
