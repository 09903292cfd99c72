"""DVC stage ``baseline``: bicubic PSNR/SSIM on the test sets, the column every SR paper starts from.

Run from the repository root: ``python stages/baseline.py``. Reads the ``baseline`` section of
``params.yaml`` and ``data/raw/<set>/``; writes ``metrics/bicubic.json`` as
``{"Set5": {"x2": {"psnr": .., "ssim": ..}, ...}, "Set14": ...}`` (a DVC metrics file) and
``results/bicubic.json``, the same with every image's scores (``{"sets": {set: {"x2": {.., "images":
{name: {"psnr", "ssim"}}}}}}``, as ``results/<model>.json``) for the report's per-image table.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from vdsr.config import ParamsError, load_section, require
from vdsr.evaluate import bicubic_upscaler, evaluate_folder, format_table, summary
from vdsr.images import ImageError
from vdsr.io import error_message, write_json_atomic

from paths import RAW_DIR, RESULTS_DIR

METRICS_FILE = Path("metrics/bicubic.json")  # the stage's output in dvc.yaml
RESULTS_FILE = RESULTS_DIR / "bicubic.json"  # the stage's outs in dvc.yaml
TEST_SETS = ("Set5", "Set14", "B100", "Urban100", "T91", "BSD200")

log = logging.getLogger("vdsr.stages.baseline")


@dataclass(frozen=True)
class BaselineParams:
    sets: list[str]  # test sets, folders of data/raw
    scales: list[int]  # 2, 3 and/or 4

    def __post_init__(self) -> None:
        require(len(self.sets) > 0, "baseline.sets", "at least one set", self.sets)
        for i, name in enumerate(self.sets):
            require(name in TEST_SETS, f"baseline.sets[{i}]", "one of " + ", ".join(TEST_SETS), name)
        require(len(self.scales) > 0, "baseline.scales", "at least one scale", self.scales)
        for i, scale in enumerate(self.scales):
            require(scale in (2, 3, 4), f"baseline.scales[{i}]", "2, 3 or 4", scale)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = load_section(BaselineParams, "baseline")
        log.info("baseline: params %s", dataclasses.asdict(params))
        results = {name: evaluate_folder(RAW_DIR / name, params.scales, bicubic_upscaler, progress=f"bicubic {name}")
                   for name in params.sets}
        table = {name: summary(by_scale) for name, by_scale in results.items()}
        write_json_atomic(RESULTS_FILE, {"sets": results})
        write_json_atomic(METRICS_FILE, table)
    except (ParamsError, ImageError, ValueError, OSError) as error:  # OSError: disk full, read-only folder...
        print(f"baseline: error: {error_message(error)}", file=sys.stderr)
        return 1
    log.info("baseline: bicubic\n%s\n-> %s, %s", format_table(table), METRICS_FILE, RESULTS_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
