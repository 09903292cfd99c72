"""The paper's Table 3 from the shipped models: ``python -m vdsr.table3`` writes
``reports/table3.md`` and ``reports/table3.png``.

Columns, each beside the paper's (Kim et al. 2016, Table 3; :data:`vdsr.paper.TABLE3`): bicubic
(ours), SRCNN (ours, when an SRCNN release is shipped), VDSR (ours, ``pretrained/vdsr.pt``) and
VDSR+ (ours, the x8 self-ensemble of the same weights, :mod:`vdsr.inference`, where it was
measured; compared with the paper's plain VDSR, which has no such row). PSNR / SSIM on Y with
``scale`` pixels shaved, in exact fp32 (:mod:`vdsr.evaluate`).

SRCNN may be shipped two ways, each its own column compared with the paper's SRCNN: one model for
all scales (``srcnn.pt``), and one model per scale as Dong et al. trained it (``srcnn_x2.pt``,
``srcnn_x3.pt``, ``srcnn_x4.pt``, :func:`vdsr.release.release_files`), whose column "srcnn (one per scale)"
takes each scale's cells from that scale's release (x2 from ``srcnn_x2_eval.json``, ...). With
both shipped the first is labelled "srcnn (one for x2-x4)"; a scale whose release is not shipped
shows "–" and the report names the missing files. Bicubic comes from the first column's
evaluation (merged the same way when that is the per-scale one; a scale it lacks from the next).

The scores are the releases' own ``eval.json``, written by ``python -m vdsr.release publish``
together with the weights; they are used only while the weights file still has the sha256 the
release recorded (``eval.json`` key ``weights.sha256``, or for releases made before that key,
the model card's), so the table takes seconds. A release whose weights changed without a new
publish stops the command with the file named: publish it again.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdsr import paper
from vdsr.io import error_message, sha256_file, write_text_atomic

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
REPORT, FIGURE = Path("reports/table3.md"), Path("reports/table3.png")
PLUS = "self_ensemble"  # eval.json key of the x8 self-ensemble's table
PER_SCALE = ("srcnn",)  # kinds also shipped as one model per scale (at vdsr.release.SCALES)


@dataclass(frozen=True)
class Release:
    """One shipped model: its weights, the evaluation publish wrote, the card that names its sha256."""

    kind: str  # "vdsr" | "srcnn": the paper's column it is compared with
    weights: Path
    scores: Path
    card: Path
    scale: int | None = None  # a per-scale release's one scale (srcnn_x2.pt: 2); None: one model for all


def shipped_releases(root: Path = ROOT) -> list[Release]:
    """The releases present under ``root/pretrained``, SRCNN first (the paper's column order): for
    each kind the model for all scales, then the per-scale ones by scale (:func:`vdsr.release.release_files`)."""
    from vdsr.release import SCALES, release_files

    folder = root / "pretrained"
    releases = []
    for kind in ("srcnn", "vdsr"):
        for scale in (None, *(SCALES if kind in PER_SCALE else ())):
            files = release_files(kind, scale)
            releases.append(Release(kind, folder / files.model, folder / files.eval, folder / files.card, scale))
    return [release for release in releases if release.weights.is_file()]


@dataclass(frozen=True)
class Source:
    """The releases of one model column: one for all scales, or a kind's per-scale releases."""

    label: str
    kind: str
    releases: tuple[Release, ...]

    @property
    def per_scale(self) -> bool:
        return self.releases[0].scale is not None


def sources(releases: list[Release]) -> list[Source]:
    """The model columns of ``releases`` in their order: each release for all scales alone, each
    kind's per-scale releases together as "<kind> (one per scale)"; a kind's release for all scales
    is labelled "<kind> (one for x2-x4)" (its scales) when the per-scale column is there too."""
    from vdsr.release import SCALES

    groups: dict[tuple[str, bool], list[Release]] = {}
    for release in releases:
        groups.setdefault((release.kind, release.scale is not None), []).append(release)
    found = []
    for (kind, per_scale), members in groups.items():
        if per_scale:
            label = f"{kind} (one per scale)"
        elif (kind, True) in groups:
            label = f"{kind} (one for x{SCALES[0]}-x{SCALES[-1]})"  # release_files' scales: no second read
        else:
            label = kind
        found.append(Source(label, kind, tuple(members)))
    return found


def recorded_sha256(release: Release, scores: dict[str, Any]) -> str | None:
    """The weights' sha256 that ``scores`` were computed for: eval.json's own record, else the card's."""
    if isinstance(scores.get("weights"), dict) and scores["weights"].get("sha256"):
        return str(scores["weights"]["sha256"])
    if release.card.is_file():
        found = re.search(r"sha256 `([0-9a-f]{64})`", release.card.read_text())
        return found.group(1) if found else None
    return None


def release_scores(release: Release) -> dict[str, Any]:
    """The release's eval.json, checked against its weights; ``ValueError`` naming the files if stale."""
    if not release.scores.is_file():
        scale = "" if release.scale is None else f" --scale {release.scale}"
        raise ValueError(f"{release.scores}: missing; run `python -m vdsr.release publish{scale}` for {release.weights}")
    scores = json.loads(release.scores.read_text())
    recorded, actual = recorded_sha256(release, scores), sha256_file(release.weights)
    if recorded != actual:
        raise ValueError(f"{release.scores} was computed for weights with sha256 {recorded}, but {release.weights} "
                         f"has {actual}: publish the weights again (python -m vdsr.release publish)")
    return scores


def source_tables(source: Source) -> dict[str, paper.Table]:
    """``{"model", "bicubic"[, PLUS]: table}`` of a column: its release's eval.json, or for per-scale
    releases each one's cells at its own scale, merged (sets in the first release's order, scales
    ascending); each release checked by :func:`release_scores`."""
    if not source.per_scale:
        scores = release_scores(source.releases[0])
        return {key: scores[key] for key in ("model", "bicubic", PLUS) if scores.get(key)}
    merged: dict[str, paper.Table] = {}
    for release in source.releases:
        scores, key = release_scores(release), f"x{release.scale}"
        if not any(key in by_scale for by_scale in scores["model"].values()):
            raise ValueError(f"{release.scores} has no {key} scores, but {release.weights} is the {key} release: "
                             f"publish it again (python -m vdsr.release publish --scale {release.scale})")
        for table in ("model", "bicubic", PLUS):
            for dataset, by_scale in (scores.get(table) or {}).items():
                if key in by_scale:
                    merged.setdefault(table, {}).setdefault(dataset, {})[key] = by_scale[key]
    return merged


def columns(releases: list[Release]) -> list[paper.Column]:
    """Table columns: bicubic (from the first column's evaluation; a cell it lacks, at a scale
    whose per-scale release is not shipped, from the next column's that has it), then each model
    column of :func:`sources`, then the x8 self-ensembles ("<kind>+") where measured."""
    cols: list[paper.Column] = []
    plus: list[paper.Column] = []
    bicubic: paper.Table = {}
    for source in sources(releases):
        tables = source_tables(source)
        for dataset, by_scale in tables["bicubic"].items():  # the first's; cells it lacks from the next
            bicubic[dataset] = {**by_scale, **bicubic.get(dataset, {})}
        cols.append(paper.Column(source.label, source.kind, tables["model"]))
        if tables.get(PLUS):
            variant = source.label.removeprefix(source.kind).strip(" ()")
            label = f"{source.kind}+ ({variant + ', ' if variant else ''}x8 self-ensemble)"
            plus.append(paper.Column(label, source.kind, tables[PLUS]))
    if not cols:
        raise ValueError(f"no shipped release under {ROOT / 'pretrained'}")
    bicubic = {dataset: dict(sorted(by_scale.items(), key=lambda item: int(item[0][1:])))
               for dataset, by_scale in bicubic.items()}  # the rows of the table: x2, x3, x4 per set
    return [paper.Column("bicubic", "bicubic", bicubic), *cols, *plus]


def _relative(path: Path) -> Path:
    return path.relative_to(path.parents[1])


def report_text(releases: list[Release]) -> str:
    """reports/table3.md: the table and where each column comes from (every release file used)."""
    lines_of_sources = []
    for source in sources(releases):
        for r in source.releases:
            at = "" if r.scale is None else f" x{r.scale}"
            lines_of_sources.append(f"- `{source.label}`{at}: `{_relative(r.weights)}` (sha256 "
                                    f"`{sha256_file(r.weights)[:16]}...`), scores from `{_relative(r.scores)}`")
    missing = [kind for kind in ("srcnn", "vdsr") if kind not in {r.kind for r in releases}]
    partial = []
    from vdsr.release import SCALES, release_files

    for kind in PER_SCALE:
        shipped = {r.scale for r in releases if r.kind == kind and r.scale is not None}
        if shipped and set(SCALES) - shipped:
            names = ", ".join(f"`pretrained/{release_files(kind, s).model}`" for s in SCALES if s not in shipped)
            partial.append(f"Not shipped yet: {names} (the \"{kind} (one per scale)\" column shows – there).")
    lines = [
        "# Table 3 of the paper, from the shipped models",
        "",
        "Written by `python -m vdsr.table3` from the releases in `pretrained/`; do not edit by hand",
        "(`tests/test_table3.py` fails when it disagrees with their `eval.json`). PSNR (dB) / SSIM on Y,",
        "`scale` pixels shaved, exact fp32; \"paper\" is Kim et al. 2016, Table 3 (291 training images);",
        "the \"+\" column is the x8 self-ensemble of the same weights, compared with the paper's plain model.",
        "",
        paper.results_table(columns(releases)).rstrip(),
        "",
        "Sources:",
        "",
        *lines_of_sources,
    ]
    if missing:
        lines += ["", f"Not shipped yet: {', '.join(missing)} (its column is absent)."]
    for line in partial:
        lines += ["", line]
    return "\n".join(lines) + "\n"


def write_figure(cols: list[paper.Column], path: Path) -> None:
    """PSNR of each trained model minus the paper's VDSR, per set and scale, as grouped bars, with the
    paper's SRCNN as a marker (bicubic, 1-4 dB below, would flatten the rest; it is in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(dataset, scale) for dataset, by_scale in cols[0].table.items() for scale in by_scale]
    cols = [column for column in cols if column.paper != "bicubic"]
    figure, axes = plt.subplots(figsize=(10, 4), dpi=110)
    width = 0.8 / len(cols)
    for i, column in enumerate(cols):
        values = []
        for dataset, scale in cells:
            ours = column.table.get(dataset, {}).get(scale)
            reference = paper.TABLE3[dataset][scale]["vdsr"][0]
            values.append(ours["psnr"] - reference if ours else float("nan"))
        axes.bar([k + (i - (len(cols) - 1) / 2) * width for k in range(len(cells))], values, width,
                 label=column.label)
    srcnn = [paper.TABLE3[d][s]["srcnn"][0] - paper.TABLE3[d][s]["vdsr"][0] for d, s in cells]
    axes.scatter(range(len(cells)), srcnn, marker="_", s=400, color="black", label="paper's SRCNN", zorder=3)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(cells)), [f"{d}\n{s}" for d, s in cells], fontsize=8)
    axes.set_ylabel("PSNR minus the paper's VDSR (dB)")
    axes.set_title("Ours against the paper's VDSR (0 dB); Table 3 sets and scales")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp, metadata={"Software": None})  # no version string: the bytes follow the numbers
    plt.close(figure)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdsr.table3", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (its pretrained/ and reports/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        releases = shipped_releases(args.root)
        text = report_text(releases)
        write_text_atomic(args.root / REPORT, text)
        write_figure(columns(releases), args.root / FIGURE)
    except (OSError, ValueError, KeyError) as error:
        print(f"vdsr.table3: error: {error_message(error)}", file=sys.stderr)
        return 1
    log.info("table3: wrote %s and %s from %s", args.root / REPORT, args.root / FIGURE,
             ", ".join(str(r.scores.relative_to(args.root)) for r in releases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
