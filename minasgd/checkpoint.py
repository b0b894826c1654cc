"""Model checkpoints: the flat parameter vector plus what identifies the model.

A checkpoint is an .npz holding `params` (float32, 1-D), `model` (name),
`fingerprint` (see `Model.fingerprint`) and a JSON `meta` string (step, epoch,
server version...). A parameter server's checkpoint adds its optimizer's state
as more float32 vectors named `state.<name>` (for example `state.velocity`) and
its counters in `meta`; docs/checkpoint.md lists every field. It is written
atomically: to a temporary file in the same folder, flushed to disk, then
renamed over the old one, so a crash mid-write leaves the previous checkpoint
intact. The file gets the usual permissions (0666 less the umask).

Reading one never runs code and never trusts it: `load` opens the zip itself, refuses members
that would unpack to much more than the file holds (a zip bomb), reads each array's header and
checks its type and shape BEFORE reading its data (a header may claim 2**40 floats), bounds the
JSON `meta`, refuses non-finite parameters, and turns whatever else goes wrong with a damaged
file into one CheckpointError line. A crash mid-write can leave a `model.npz.*.tmp` behind;
`remove_stale_temporaries` clears them (a resumed run does).
"""

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or for another model."""


STATE_PREFIX = "state."
MAX_MEMBERS = 16  # arrays in a checkpoint: params, model, fingerprint, meta and a few state vectors
MAX_META = 1 << 20  # characters of the JSON meta
MAX_NAME = 4096  # characters of the model name or fingerprint
SLACK = 1 << 20  # bytes the members may unpack to beyond the file's own size (np.savez stores, not deflates)


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
    """Return {"params", "model", "fingerprint", "meta", "state"}; CheckpointError (one line) on any
    problem: missing, damaged, hostile (see the module's docstring), or for another model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        arrays = _read_arrays(path)
        ckpt = {"params": _vector(arrays, "params"), "model": _text(arrays, "model", MAX_NAME),
                "fingerprint": _text(arrays, "fingerprint", MAX_NAME),
                "meta": json.loads(_text(arrays, "meta", MAX_META)),
                "state": {k[len(STATE_PREFIX):]: _vector(arrays, k) for k in arrays if k.startswith(STATE_PREFIX)}}
    except CheckpointError as e:
        raise CheckpointError(f"{path}: not a readable minasgd checkpoint ({e})") from None
    except Exception as e:  # whatever a damaged file makes zipfile, zlib, numpy or json raise (MemoryError too)
        raise CheckpointError(f"{path}: not a readable minasgd checkpoint ({type(e).__name__}: {_plain(e)})") from None
    if not isinstance(ckpt["meta"], dict):
        raise CheckpointError(f"{path}: meta must be a JSON object")
    if not np.isfinite(ckpt["params"]).all():
        raise CheckpointError(f"{path}: the parameters hold {int((~np.isfinite(ckpt['params'])).sum())} NaN/Inf values")
    if expect_fingerprint is not None and ckpt["fingerprint"] != expect_fingerprint:
        raise CheckpointError(
            f"{path}: checkpoint is for model {_plain(ckpt['fingerprint'])}, not {expect_fingerprint}")
    return ckpt


def remove_stale_temporaries(path):
    """Delete the `<name>.*.tmp` files a crash during `save` left next to `path`; returns their names."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f"{path.name}.*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp.name)
        except OSError:
            pass
    return removed


def _read_arrays(path):
    """{name: array} of the .npy members of the zip at `path`, each checked before its data is read."""
    size = path.stat().st_size
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if len(infos) > MAX_MEMBERS:
            raise CheckpointError(f"{len(infos)} members, at most {MAX_MEMBERS} expected")
        unpacked = sum(info.file_size for info in infos)
        if unpacked > size + SLACK:
            raise CheckpointError(f"its members would unpack to {unpacked:,} bytes from a {size:,}-byte file")
        arrays = {}
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise CheckpointError(f"member {_plain(info.filename)!r} is not a .npy array")
            with z.open(info) as f:
                arrays[info.filename[:-4]] = _read_npy(f, info.file_size, info.filename)
        return arrays


def _read_npy(f, size, name):
    """One .npy member: its header first (a float or str array of at most one dimension whose data
    fits in the member's `size` bytes), then exactly that much data."""
    version = npy_format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(f)
    else:
        raise CheckpointError(f"{_plain(name)} has .npy format {version}")
    if dtype.hasobject or dtype.kind not in "fU" or len(shape) > 1:
        raise CheckpointError(f"{_plain(name)} is {dtype}{list(shape)}: not a float vector or a string")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    nbytes = count * dtype.itemsize
    if not 0 <= nbytes <= size:
        raise CheckpointError(f"{_plain(name)} claims {nbytes:,} bytes of data in a {size:,}-byte member")
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise CheckpointError(f"{_plain(name)} is truncated")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _vector(arrays, key):
    """arrays[key] as a float32 vector (1-D)."""
    if key not in arrays:
        raise CheckpointError(f"no {key!r} array")
    v = arrays[key]
    if v.dtype.kind != "f" or v.ndim != 1:
        raise CheckpointError(f"{key} must be a flat float vector, got {v.dtype}{list(v.shape)}")
    return v.astype(np.float32)


def _text(arrays, key, limit):
    """arrays[key] as a str of at most `limit` characters."""
    if key not in arrays:
        raise CheckpointError(f"no {key!r} array")
    v = arrays[key]
    if v.dtype.kind != "U" or v.ndim != 0 or v.dtype.itemsize > 4 * limit:
        raise CheckpointError(f"{key} must be a string of at most {limit} characters")
    return str(v)


def _plain(text, limit=200):
    """`text` cut to `limit` characters, with anything unprintable (escape sequences) as "?"."""
    text = str(text)[:limit]
    return "".join(c if c.isprintable() else "?" for c in text)
