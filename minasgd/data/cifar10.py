"""CIFAR-10, binary version: reader and downloader.

The binary version is a folder `cifar-10-batches-bin/` with data_batch_1.bin .. data_batch_5.bin
(train) and test_batch.bin (test). Each file is a run of 3073-byte records: one label byte (0-9)
followed by a 32x32 RGB image stored channel by channel (1024 red bytes, then green, then blue),
rows top to bottom. The reader turns them into NHWC. Real files hold 10000 records each; any
whole number of records is accepted, so tests can use tiny files.

`download` fetches the official archive once, checks its checksum, and unpacks it safely.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

import numpy as np

from .dataset import Dataset, DatasetError, Progress, progress_counter

DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
# The md5 the CIFAR-10 page lists for cifar-10-binary.tar.gz. A checksum is "md5:HEX" or
# "sha256:HEX"; a bare hex string is taken by its length (32 digits md5, 64 sha256).
DEFAULT_CHECKSUM = "md5:c32a1d4ab5d03f1284b67883e8d87530"
FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RECORD = 1 + 3 * 32 * 32  # label byte + CHW pixels


# ------------------------------------------------------------------ reading

def find(root: str | Path) -> Path | None:
    """The folder holding the .bin files: `root` itself or root/cifar-10-batches-bin, else None.

    A folder with all six files wins; failing that, one with at least data_batch_1.bin (so that
    `load` can name the file that is missing).
    """
    candidates = [Path(root), Path(root) / FOLDER]
    for folder in candidates:
        if is_complete(folder):
            return folder
    for folder in candidates:
        if (folder / TRAIN_FILES[0]).is_file():
            return folder
    return None


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One .bin file -> (uint8 images (n, 32, 32, 3), int32 labels (n,))."""
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"CIFAR-10 file missing: {path}") from None
    except OSError as e:
        raise DatasetError(f"cannot read CIFAR-10 file {path}: {e.strerror or e}") from None
    if raw.size == 0 or raw.size % RECORD:
        raise DatasetError(f"truncated or not a CIFAR-10 binary file: {path} "
                           f"({raw.size} bytes is not a whole number of {RECORD}-byte records)")
    records = raw.reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int32)
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DatasetError(f"bad label {labels[bad[0]]} in record {bad[0]} of {path} (expected 0-9)")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_classes(folder: Path) -> list[str]:
    """Class names from batches.meta.txt (one a line) if present, else the standard ten."""
    path = folder / META_FILE
    if not path.is_file():
        return list(CLASSES)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read CIFAR-10 class names from {path}: {e}") from None
    if len(names) != 10:
        raise DatasetError(f"expected 10 class names in {path}, found {len(names)}")
    return names


def load(root: str | Path) -> Dataset:
    """CIFAR-10 from `root` (or root/cifar-10-batches-bin); run `download` first."""
    folder = find(root)
    if folder is None:
        raise DatasetError(f"CIFAR-10 not found in {root} (looked for {TRAIN_FILES[0]} there and in "
                           f"{Path(root) / FOLDER}); get it with `minasgd data cifar10`")
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    test_x, test_y = read_batch(folder / TEST_FILE)
    return Dataset(
        name="cifar10",
        classes=read_classes(folder),
        train_x=np.concatenate([x for x, _ in train]),
        train_y=np.concatenate([y for _, y in train]),
        test_x=test_x,
        test_y=test_y,
    )


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TRAIN_FILES + [TEST_FILE])


# ------------------------------------------------------------------ downloading

def _hasher(checksum: str):
    """(hashlib object, expected hex digest) for "md5:HEX", "sha256:HEX" or a bare hex digest."""
    algo, _, digest = checksum.strip().lower().rpartition(":")
    algo = algo or {32: "md5", 64: "sha256"}.get(len(digest), "")
    if algo not in ("md5", "sha256") or len(digest) != {"md5": 32, "sha256": 64}[algo]:
        raise DatasetError(f"bad checksum {checksum!r}: expected md5:<32 hex digits> or sha256:<64 hex digits>")
    return hashlib.new(algo), digest


def _fetch(url: str, dest: Path, hasher, progress: Progress | None) -> None:
    """Stream `url` into the file `dest`, feeding every byte to `hasher`."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            advance = progress_counter(progress, "downloading CIFAR-10 (bytes)", total)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                hasher.update(chunk)
                advance(len(chunk))
    except urllib.error.HTTPError as e:
        raise DatasetError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DatasetError(f"could not download {url}: {e.reason}") from None
    except (OSError, ValueError) as e:  # ValueError: a malformed URL
        raise DatasetError(f"could not download {url}: {e}") from None


def _extract(archive: Path, dest: Path) -> None:
    """Unpack the regular files and folders of a .tar.gz into `dest`, refusing unsafe members.

    A member whose name is absolute or climbs out with "..", and any link or device entry, is
    rejected before anything is written, so a hostile archive cannot write outside `dest`.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                parts = PurePosixPath(m.name).parts
                if m.name.startswith(("/", "\\")) or ".." in parts or not (m.isfile() or m.isdir()):
                    raise DatasetError(f"refusing to extract unsafe archive member {m.name!r} from {archive}")
            for m in members:
                target = dest.joinpath(*PurePosixPath(m.name).parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"cannot unpack {archive}: {e}") from None


def download(root: str | Path, url: str = DEFAULT_URL, checksum: str = DEFAULT_CHECKSUM,
             progress: Progress | None = None) -> Path:
    """Download and unpack CIFAR-10 into root/cifar-10-batches-bin; returns that folder.

    Does nothing if the files are already there. The archive goes to a temporary file under
    `root` and is checked against `checksum` before unpacking into a temporary folder, which is
    then renamed into place: on any failure (network, checksum, bad archive) nothing is left
    behind, and the error is a one-line DatasetError.
    """
    root = Path(root)
    target = root / FOLDER
    existing = find(root)
    if existing is not None and is_complete(existing):
        return existing
    hasher, expected = _hasher(checksum)
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=root, prefix=".cifar10-download-"))
    except OSError as e:
        raise DatasetError(f"cannot create the data folder {root}: {e.strerror or e}") from None
    try:
        archive = work / "cifar-10-binary.tar.gz"
        _fetch(url, archive, hasher, progress)
        if hasher.hexdigest() != expected:
            raise DatasetError(f"checksum mismatch for {url}: expected {hasher.name} {expected}, "
                               f"got {hasher.hexdigest()}")
        unpacked = work / "unpacked"
        _extract(archive, unpacked)
        if not is_complete(unpacked / FOLDER):
            raise DatasetError(f"the archive from {url} has no complete {FOLDER}/ folder")
        try:
            if target.is_dir():  # an incomplete earlier copy
                shutil.rmtree(target)
            (unpacked / FOLDER).replace(target)
        except OSError as e:
            raise DatasetError(f"cannot move the unpacked files to {target}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
