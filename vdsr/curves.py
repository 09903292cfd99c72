"""The training curves of one model as PNG images, drawn here (matplotlib, Agg), so that
``dvc plots show`` displays them without a network: its interactive charts (Vega-Lite) load their
script from the internet, its images need nothing.

From ``plots/train_<name>.csv`` (per epoch: epoch, train_loss, lr, val_psnr_x<s>..., as the train
stage writes it) and the ``history`` in the meta of ``models/<name>.pt`` (for each epoch's
``elapsed_s``: training and validation time of all runs so far; the CSV has no time column), the
DVC stage ``curves@<name>`` writes into ``plots/curves/``:

- ``<name>_val_psnr.png``: Set5 validation PSNR of each scale against training hours, the paper's
  SRCNN dotted -- drawn by :func:`vdsr.model_card.write_curve`, the release's own chart;
- ``<name>_loss.png`` and ``<name>_lr.png``: training loss and learning rate against the epoch.

Run from the repository root: ``python vdsr/curves.py NAME`` (the stage's command: a script path,
as every stage's is) or ``python -m vdsr.curves NAME``.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as vdsr/curves.py: import vdsr from this repository,
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # not vdsr/ itself (its io.py would shadow io)

from vdsr.config import ParamsError
from vdsr.io import error_message
from vdsr.model_card import write_curve

CURVES_DIR = Path("plots/curves")  # also the stage's `outs` in dvc.yaml and a `plots:` entry


def read_history(csv_path: Path, model_path: Path) -> list[dict[str, float]]:
    """One row per epoch: the CSV's columns as floats (an empty cell: NaN) and ``elapsed_s`` from the
    model file's meta history, matched by epoch; :class:`ParamsError` naming the file for a missing
    column or an epoch the other file lacks."""
    from vdsr.models import load_model  # torch is imported only here

    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"epoch", "train_loss", "lr"} <= set(rows[0]):
        raise ParamsError(f"{csv_path}: expected a header with epoch, train_loss, lr and at least one row")
    try:
        history = [{key: float(value) if value not in ("", None) else math.nan for key, value in row.items()}
                   for row in rows]
    except ValueError as error:
        raise ParamsError(f"{csv_path}: expected numbers: {error}") from None
    recorded = load_model(model_path)[2].get("history") or []
    elapsed = {int(row["epoch"]): float(row["elapsed_s"]) for row in recorded if "elapsed_s" in row}
    for row in history:
        epoch = int(row["epoch"])
        if epoch not in elapsed:
            raise ParamsError(f"{model_path}: meta history: expected epoch {epoch} of {csv_path} with its elapsed_s")
        row["elapsed_s"] = elapsed[epoch]
    return history


def write_epoch_chart(history: list[dict[str, float]], key: str, label: str, path: Path, *, log_y: bool) -> None:
    """``key`` of each row against its epoch, as PNG (matplotlib, Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    axes.plot([row["epoch"] for row in history], [row[key] for row in history], marker="o", markersize=3)
    if log_y and all(row[key] > 0 for row in history):
        axes.set_yscale("log")
    axes.set_xlabel("epoch")
    axes.set_ylabel(label)
    axes.set_title(f"{label} after each epoch")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)


def write_curves(name: str, csv_path: Path, model_path: Path, out_dir: Path = CURVES_DIR) -> list[Path]:
    """The three charts of model ``name`` (module docstring) in ``out_dir``; their paths."""
    history = read_history(csv_path, model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {key: out_dir / f"{name}_{key}.png" for key in ("val_psnr", "loss", "lr")}
    write_curve(history, paths["val_psnr"])
    write_epoch_chart(history, "train_loss", "training loss", paths["loss"], log_y=True)
    write_epoch_chart(history, "lr", "learning rate", paths["lr"], log_y=False)
    return list(paths.values())


def main(argv: list[str] | None = None) -> int:
    args: list[Any] = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python vdsr/curves.py NAME   (plots/train_NAME.csv -> plots/curves/NAME_*.png)", file=sys.stderr)
        return 2
    name = args[0]
    try:
        written = write_curves(name, Path(f"plots/train_{name}.csv"), Path(f"models/{name}.pt"))
    except (ParamsError, OSError, ValueError, KeyError) as error:
        print(f"curves: error: {error_message(error)}", file=sys.stderr)
        return 1
    print(f"curves: wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
