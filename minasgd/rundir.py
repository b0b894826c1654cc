"""The run directory every training run writes.

    metrics.jsonl   one JSON object per logged step or epoch ({"kind": "step" | "epoch", ...})
    model.npz       the flat parameter vector + model name and fingerprint (atomic write); a parameter
                    server's also holds its full state for `--resume` (docs/checkpoint.md)
    summary.json    final numbers: test_accuracy, test_loss, epochs, steps, wall_seconds, images_per_second, ...
"""

import json
import os
import time
from pathlib import Path

from . import checkpoint


def default_run_dir(prefix="train"):
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    @staticmethod
    def model_path_in(path):
        """Where a run directory keeps its checkpoint (without creating anything)."""
        return Path(path) / "model.npz"

    def __init__(self, path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.model_path = self.path / "model.npz"
        self.summary_path = self.path / "summary.json"
        self._metrics = open(self.metrics_path, "a", buffering=1)

    def log(self, record):
        """Append one JSON record to metrics.jsonl (line-buffered, so a crash keeps what was logged)."""
        self._metrics.write(json.dumps(record) + "\n")

    def save_model(self, model_name, fingerprint, params, meta=None):
        return checkpoint.save(self.model_path, model_name, fingerprint, params, meta)

    def write_summary(self, summary):
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.summary_path)

    def close(self):
        self._metrics.close()
