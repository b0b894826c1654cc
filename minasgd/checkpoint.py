"""Model checkpoints: the flat parameter vector plus what identifies the model.

A checkpoint is an .npz holding `params` (float32, 1-D), `model` (name),
`fingerprint` (see `Model.fingerprint`) and a JSON `meta` string (step, epoch,
server version...). A parameter server's checkpoint adds its optimizer's state
as more float32 vectors named `state.<name>` (for example `state.velocity`) and
its counters in `meta`; docs/checkpoint.md lists every field. It is written
atomically: to a temporary file in the same folder, flushed to disk, then
renamed over the old one, so a crash mid-write leaves the previous checkpoint
intact. The file gets the usual permissions (0666 less the umask), and it is
read back with allow_pickle=False: loading a checkpoint never runs code.
"""

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or for another model."""


STATE_PREFIX = "state."


def _file_mode():
    """0666 less the process umask: what open() would have given (mkstemp makes files 0600)."""
    mask = os.umask(0o022)  # reading the umask means setting it; done once, at import
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


def save(path, model_name, fingerprint, params, meta=None, state=None):
    """Write a checkpoint atomically. `state`: {name: float32 vector} saved as `state.<name>`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = np.ascontiguousarray(params, dtype=np.float32)
    arrays = {STATE_PREFIX + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (state or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, params=params, model=np.array(model_name), fingerprint=np.array(fingerprint),
                     meta=np.array(json.dumps(meta or {})), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path, expect_fingerprint=None):
    """Return {"params", "model", "fingerprint", "meta", "state"}; CheckpointError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            ckpt = {"params": z["params"].astype(np.float32), "model": str(z["model"]),
                    "fingerprint": str(z["fingerprint"]), "meta": json.loads(str(z["meta"])),
                    "state": {k[len(STATE_PREFIX):]: z[k].astype(np.float32) for k in z.files
                              if k.startswith(STATE_PREFIX)}}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable minasgd checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt["meta"], dict):
        raise CheckpointError(f"{path}: meta must be a JSON object")
    if ckpt["params"].ndim != 1:
        raise CheckpointError(f"{path}: params must be a flat vector, got shape {ckpt['params'].shape}")
    if expect_fingerprint is not None and ckpt["fingerprint"] != expect_fingerprint:
        raise CheckpointError(
            f"{path}: checkpoint is for model {ckpt['fingerprint']}, not {expect_fingerprint}")
    return ckpt
