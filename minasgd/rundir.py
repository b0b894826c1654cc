"""The run directory every training run writes.

    metrics.jsonl   one JSON object per logged step or epoch ({"kind": "step" | "epoch", ...})
    model.npz       the flat parameter vector + model name and fingerprint (atomic write); a parameter
                    server's also holds its full state for `--resume` (docs/checkpoint.md)
    summary.json    final numbers: test_accuracy, test_loss, epochs, steps, wall_seconds, images_per_second, ...
"""

import errno
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
        self._metrics = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self.log_failures = 0  # records the disk refused (full, read-only, quota)
        self.log_error = None  # why the last one was refused, until one is written again

    def log(self, record):
        """Append one JSON record to metrics.jsonl, unbuffered (a crash keeps what was logged).

        Returns True, or False if the disk refused it (full, read-only): then the file is cut back
        to its last whole line, the reason is kept in `log_error` and nothing is raised, so a full
        disk costs a run its metrics lines, never its training (the caller may warn)."""
        line = memoryview((json.dumps(record) + "\n").encode("utf-8"))
        start = None
        try:
            start = os.lseek(self._metrics, 0, os.SEEK_END)
            while line:
                written = os.write(self._metrics, line)
                if not written:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                line = line[written:]
        except OSError as e:
            if start is not None:
                try:
                    os.ftruncate(self._metrics, start)  # no half line for a reader to choke on
                except OSError:
                    pass
            self.log_failures += 1
            self.log_error = f"cannot write {self.metrics_path.name}: {e.strerror or e}"
            return False
        self.log_error = None
        return True

    def save_model(self, model_name, fingerprint, params, meta=None):
        return checkpoint.save(self.model_path, model_name, fingerprint, params, meta)

    def write_summary(self, summary):
        """Write summary.json atomically; OSError with one clear line (and no .tmp left) if the disk refuses."""
        tmp = self.summary_path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, self.summary_path)
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise OSError(f"cannot write {self.summary_path}: {e.strerror or e}") from None

    def close(self):
        if self._metrics is not None:
            os.close(self._metrics)
            self._metrics = None
