"""reports/table3.md agrees with the shipped releases' eval.json (it is rewritten whenever a release
changes), a release whose weights changed without a new publish is refused, and per-scale SRCNN
releases (srcnn_x2.pt, ...) make one column of their cells, missing scales shown and named."""

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


def _per_scale_releases(root: Path, scales: tuple[int, ...]) -> dict[int, dict]:
    """srcnn_x<s>.pt (stand-in weights: bytes of their own) with an eval.json of the layout publish
    writes for one scale -- only the x<s> cell of each set, the weights' sha256 -- whose model
    numbers are the shipped srcnn_eval.json's plus 0.1 dB times the scale: {scale: eval.json}."""
    shipped = json.loads((REPO_ROOT / "pretrained" / "srcnn_eval.json").read_text())
    written = {}
    for scale in scales:
        key = f"x{scale}"
        weights = root / "pretrained" / f"srcnn_x{scale}.pt"
        weights.write_bytes(f"stand-in weights of the x{scale} SRCNN".encode())
        model = {d: {key: {"psnr": t[key]["psnr"] + 0.1 * scale, "ssim": t[key]["ssim"] - 0.001 * scale}}
                 for d, t in shipped["model"].items()}
        bicubic = {d: {key: t[key]} for d, t in shipped["bicubic"].items()}
        scores = {"model": model, "bicubic": bicubic, "seconds": {d: 1.0 for d in model},
                  "weights": {"sha256": table3.sha256_file(weights)}}
        (root / "pretrained" / f"srcnn_x{scale}_eval.json").write_text(json.dumps(scores))
        written[scale] = scores
    return written


def _row(text: str, dataset: str, scale: str) -> dict[str, str]:
    """The cells of the report table's row ``dataset`` ``scale``, by column header."""
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    header = [cell.strip("| ") for cell in rows[0]]
    row = next(r for r in rows if r[:2] == [f"| {dataset}", scale])
    return dict(zip(header, (cell.strip("| ") for cell in row)))


def test_per_scale_srcnn_releases_make_one_merged_column(tmp_path: Path, capsys) -> None:
    (tmp_path / "pretrained").mkdir()
    for name in ("srcnn.pt", "srcnn_eval.json", "SRCNN_MODEL_CARD.md", "vdsr.pt", "eval.json", "MODEL_CARD.md"):
        shutil.copy(REPO_ROOT / "pretrained" / name, tmp_path / "pretrained" / name)
    per_scale = _per_scale_releases(tmp_path, (2, 3, 4))
    releases = table3.shipped_releases(tmp_path)
    assert [(r.weights.name, r.scores.name, r.card.name) for r in releases if r.scale] == [
        (f"srcnn_x{s}.pt", f"srcnn_x{s}_eval.json", f"SRCNN_X{s}_MODEL_CARD.md") for s in (2, 3, 4)]
    assert table3.main(["--root", str(tmp_path)]) == 0
    text = (tmp_path / table3.REPORT).read_text()
    multi = json.loads((REPO_ROOT / "pretrained" / "srcnn_eval.json").read_text())
    for dataset in multi["model"]:
        for scale in (2, 3, 4):
            key, row = f"x{scale}", _row(text, dataset, f"x{scale}")
            ours, theirs = per_scale[scale]["model"][dataset][key], paper.TABLE3[dataset][key]["srcnn"]
            assert row["srcnn (one per scale) (srcnn): ours"] == f"{ours['psnr']:.2f} / {ours['ssim']:.4f}"
            assert row["srcnn (one per scale) (srcnn): paper"] == f"{theirs[0]:.2f} / {theirs[1]:.4f}"
            one = multi["model"][dataset][key]  # the model for all scales: its own column, as before
            assert row["srcnn (one for x2-x4) (srcnn): ours"] == f"{one['psnr']:.2f} / {one['ssim']:.4f}"
            assert row["bicubic: ours"].startswith(f"{multi['bicubic'][dataset][key]['psnr']:.2f} / ")
    for scale in (2, 3, 4):
        assert (f"- `srcnn (one per scale)` x{scale}: `pretrained/srcnn_x{scale}.pt` (sha256 "
                f"`{table3.sha256_file(tmp_path / 'pretrained' / f'srcnn_x{scale}.pt')[:16]}...`), "
                f"scores from `pretrained/srcnn_x{scale}_eval.json`") in text
    assert "- `srcnn (one for x2-x4)`: `pretrained/srcnn.pt`" in text and "Not shipped yet" not in text
    assert (tmp_path / table3.FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with (tmp_path / "pretrained" / "srcnn_x3.pt").open("ab") as weights:
        weights.write(b"\0")  # the x3 weights changed, their eval.json did not
    assert table3.main(["--root", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert (f"srcnn_x3_eval.json was computed for weights with sha256 {per_scale[3]['weights']['sha256']}, "
            f"but {tmp_path / 'pretrained' / 'srcnn_x3.pt'} has") in error
    assert "publish the weights again" in error


def test_missing_per_scale_releases_show_dashes_and_are_named(tmp_path: Path) -> None:
    (tmp_path / "pretrained").mkdir()
    for name in ("vdsr.pt", "eval.json", "MODEL_CARD.md"):
        shutil.copy(REPO_ROOT / "pretrained" / name, tmp_path / "pretrained" / name)
    per_scale = _per_scale_releases(tmp_path, (2, 4))  # no srcnn.pt, no srcnn_x3.pt
    assert table3.main(["--root", str(tmp_path)]) == 0
    text = (tmp_path / table3.REPORT).read_text()
    vdsr = json.loads((REPO_ROOT / "pretrained" / "eval.json").read_text())
    x2, x3 = _row(text, "Set5", "x2"), _row(text, "Set5", "x3")  # every scale has its row
    assert x2["srcnn (one per scale) (srcnn): ours"].startswith(f"{per_scale[2]['model']['Set5']['x2']['psnr']:.2f} /")
    assert x3["srcnn (one per scale) (srcnn): ours"] == "–"
    assert x3["bicubic: ours"].startswith(f"{vdsr['bicubic']['Set5']['x3']['psnr']:.2f} / ")  # from the next release
    assert x3["vdsr: ours"].startswith(f"{vdsr['model']['Set5']['x3']['psnr']:.2f} / ")
    assert "srcnn (one for" not in text  # no model for all scales shipped: no such column
    assert ("Not shipped yet: `pretrained/srcnn_x3.pt` (the \"srcnn (one per scale)\" column shows – there)."
            in text)

