"""Where the pipeline's per-model files live: the one place for the paths that ``dvc.yaml`` lists.

``dvc.yaml`` runs ``train@<name>`` and ``evaluate@<name>`` for each section ``train.<name>`` of
params.yaml; both stages and the ``report`` stage find a model's files here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RAW_DIR = Path("data/raw")
RESULTS_DIR = Path("results")  # per-image scores: results/<name>.json, results/bicubic.json


@dataclass(frozen=True)
class ModelPaths:
    """The files of the model trained from section ``train.<name>``."""

    name: str

    @property
    def model(self) -> Path:
        return Path(f"models/{self.name}.pt")

    @property
    def mlflow_run(self) -> Path:  # {"run_id", "started_run_id", "tracking_uri"} of its training run
        return Path(f"models/{self.name}.mlflow_run.json")

    @property
    def checkpoint(self) -> Path:
        return Path(f"checkpoints/{self.name}/last.pt")

    @property
    def train_metrics(self) -> Path:
        return Path(f"metrics/train_{self.name}.json")

    @property
    def train_plot(self) -> Path:
        return Path(f"plots/train_{self.name}.csv")

    @property
    def eval_metrics(self) -> Path:  # written by evaluate@<name>: the means, a DVC metrics file keyed model first
        return Path(f"metrics/eval_{self.name}.json")

    @property
    def results(self) -> Path:  # written by evaluate@<name>: scores per set, scale and image, timings
        return RESULTS_DIR / f"{self.name}.json"
