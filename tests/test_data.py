"""Tests for minasgd.data: shapes, normalize / batches / shard, CIFAR-10 reader and downloader,
image folders, and the `minasgd data` helper. Everything runs offline on tiny data made here;
the download tests use an HTTP server on 127.0.0.1."""

import argparse
import functools
import hashlib
import http.server
import io
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minasgd import data
from minasgd.data import Dataset, DatasetError, cifar10, folder, shapes

# ------------------------------------------------------------------ shapes


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return root, shapes.load(root, seed=3, train_size=200, test_size=50, progress=False)


def test_shapes_layout(tiny_shapes):
    _, d = tiny_shapes
    assert d.name == "shapes" and d.classes == shapes.CLASSES and d.num_classes == 10
    assert d.train_x.shape == (200, 32, 32, 3) and d.train_x.dtype == np.uint8
    assert d.test_x.shape == (50, 32, 32, 3) and d.test_x.dtype == np.uint8
    assert d.train_y.shape == (200,) and d.train_y.dtype == np.int32
    assert d.test_y.shape == (50,) and d.test_y.dtype == np.int32
    assert set(d.train_y.tolist()) == set(range(10)) and set(d.test_y.tolist()) == set(range(10))
    assert np.bincount(d.train_y).min() == 20  # balanced classes
    assert d.train_x.std() > 30  # images, not a blank canvas


def test_shapes_deterministic_from_seed():
    a = shapes.make(seed=7, train_size=30, test_size=20, progress=False)
    b = shapes.make(seed=7, train_size=30, test_size=20, progress=False)
    c = shapes.make(seed=8, train_size=30, test_size=20, progress=False)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.train_y, b.train_y)
    np.testing.assert_array_equal(a.test_x, b.test_x)
    assert not np.array_equal(a.train_x, c.train_x)
    # the test split has its own random stream: it does not depend on the train size
    d = shapes.make(seed=7, train_size=40, test_size=20, progress=False)
    np.testing.assert_array_equal(a.test_x, d.test_x)
    np.testing.assert_array_equal(a.test_y, d.test_y)


def test_shapes_cache_written_and_reused(tiny_shapes, monkeypatch):
    root, d = tiny_shapes
    path = shapes.cache_path(root, 3, 200, 50)
    assert path.is_file() and f"v{shapes.VERSION}" in path.name
    assert [p.name for p in root.iterdir()] == [path.name]  # no temporary files left

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(shapes, "make", fail)
    again = shapes.load(root, seed=3, train_size=200, test_size=50, progress=False)
    np.testing.assert_array_equal(again.train_x, d.train_x)
    np.testing.assert_array_equal(again.test_y, d.test_y)


def test_shapes_corrupt_cache_is_remade(tmp_path):
    path = shapes.cache_path(tmp_path, 0, 20, 10)
    path.write_bytes(b"not an npz file")
    d = shapes.load(tmp_path, seed=0, train_size=20, test_size=10, progress=False)
    assert d.train_x.shape == (20, 32, 32, 3)
    assert shapes._read_cache(path, 20, 10) is not None


def test_load_dispatch(tmp_path, monkeypatch):
    monkeypatch.setenv("MINASGD_DATA", str(tmp_path))
    assert data.default_root() == tmp_path
    monkeypatch.delenv("MINASGD_DATA")
    assert data.default_root() == Path("data")
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'.*shapes, shapes:TRAIN,TEST, cifar10, folder:PATH"):
        data.load("mnist", root=tmp_path)
    with pytest.raises(DatasetError, match="CIFAR-10 not found"):
        data.load("cifar10", root=tmp_path)
    with pytest.raises(DatasetError, match="image folder .*nowhere not found"):
        data.load(f"folder:{tmp_path / 'nowhere'}")
    with pytest.raises(DatasetError, match="write shapes:TRAIN,TEST"):
        data.load("shapes:many", root=tmp_path)


def test_small_shapes_spec(tmp_path):
    small = data.load("shapes:30,10", root=tmp_path, progress=False)
    assert small.train_x.shape == (30, 32, 32, 3) and small.test_x.shape == (10, 32, 32, 3)


# ------------------------------------------------------------------ normalize, batches, shard


def test_normalize():
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    out = data.normalize(x)
    assert out.shape == (4, 3, 32, 32) and out.dtype == np.float32 and out.flags.c_contiguous
    expected = (x.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert data.normalize(np.zeros((1, 2, 2, 3), np.uint8)).min() == -2.0
    assert data.normalize(np.full((1, 2, 2, 3), 255, np.uint8)).max() == 2.0
    with pytest.raises(ValueError, match="N, H, W, 3"):
        data.normalize(np.zeros((32, 32, 3), np.uint8))


def test_batches_in_order_and_drop_last():
    x, y = np.arange(10)[:, None] * np.ones((1, 2)), np.arange(10)
    got = list(data.batches(x, y, 4))
    assert [b[1].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    np.testing.assert_array_equal(got[1][0][:, 0], [4, 5, 6, 7])
    assert [len(b[1]) for b in data.batches(x, y, 4, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError, match="batch_size"):
        list(data.batches(x, y, 0))
    with pytest.raises(ValueError, match="labels"):
        list(data.batches(x, y[:5], 2))


def test_batches_shuffled():
    x, y = np.arange(100) * 10, np.arange(100)
    got = list(data.batches(x, y, 32, rng=np.random.default_rng(5)))
    seen = np.concatenate([b[1] for b in got])
    assert sorted(seen.tolist()) == list(range(100)) and not np.array_equal(seen, y)
    assert all(np.array_equal(bx, by * 10) for bx, by in got)  # images stay with their labels
    again = np.concatenate([b[1] for b in data.batches(x, y, 32, rng=np.random.default_rng(5))])
    np.testing.assert_array_equal(seen, again)


def test_shard_disjoint_and_covering():
    n = 23
    d = Dataset("toy", ["a", "b"], np.arange(n * 3, dtype=np.uint8).reshape(n, 3),
                np.arange(n, dtype=np.int32), np.zeros((2, 3), np.uint8), np.zeros(2, np.int32))
    shards = [d.shard(i, 4) for i in range(4)]
    ids = np.concatenate([s.train_y for s in shards])
    assert sorted(ids.tolist()) == list(range(n))  # disjoint and covering
    assert {len(s.train_y) for s in shards} <= {5, 6}
    assert all(s.test_x is d.test_x and s.classes == d.classes for s in shards)
    np.testing.assert_array_equal(d.shard(1, 4).train_x, shards[1].train_x)  # deterministic
    np.testing.assert_array_equal(shards[0].train_x[:, 0], shards[0].train_y * 3)
    np.testing.assert_array_equal(d.shard(0, 1).train_y, d.train_y)
    for index, count in [(4, 4), (-1, 2), (0, 0), (0, 24)]:
        with pytest.raises(ValueError, match="shard"):
            d.shard(index, count)


# ------------------------------------------------------------------ CIFAR-10 reader


def cifar_bytes(labels, rng):
    """CIFAR-10 binary records for `labels`, with random pixels; returns (bytes, NHWC images)."""
    chw = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([np.array(labels, np.uint8)[:, None], chw.reshape(len(labels), -1)], axis=1)
    return records.tobytes(), chw.transpose(0, 2, 3, 1)


def write_cifar(folder, records_per_file=3, meta=None):
    """Five train files and a test file of `records_per_file` records; returns the expected arrays."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i, name in enumerate(cifar10.TRAIN_FILES + [cifar10.TEST_FILE]):
        labels = [(i + k) % 10 for k in range(records_per_file)]
        raw, x = cifar_bytes(labels, rng)
        (folder / name).write_bytes(raw)
        xs.append(x)
        ys.append(labels)
    if meta is not None:
        (folder / cifar10.META_FILE).write_text(meta)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], np.array(ys[5])


def test_cifar_reader(tmp_path):
    train_x, train_y, test_x, test_y = write_cifar(tmp_path / cifar10.FOLDER)
    d = data.load("cifar10", root=tmp_path)
    assert d.name == "cifar10" and d.classes == cifar10.CLASSES
    assert d.train_x.shape == (15, 32, 32, 3) and d.train_x.dtype == np.uint8 and d.train_x.flags.c_contiguous
    assert d.train_y.dtype == np.int32 and d.test_x.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(d.train_x, train_x)
    np.testing.assert_array_equal(d.train_y, train_y)
    np.testing.assert_array_equal(d.test_x, test_x)
    np.testing.assert_array_equal(d.test_y, test_y)
    # the folder itself may be given as root; class names come from batches.meta.txt if present
    names = "\n".join(f"thing{i}" for i in range(10)) + "\n\n"
    write_cifar(tmp_path / "flat", meta=names)
    assert cifar10.load(tmp_path / "flat").classes == [f"thing{i}" for i in range(10)]


def test_cifar_pixel_order(tmp_path):
    """Channel-first bytes become NHWC: red plane first, rows top to bottom."""
    record = np.zeros(cifar10.RECORD, np.uint8)
    record[0] = 7
    record[1 + 0 * 1024 + 0 * 32 + 1] = 11  # red, row 0, column 1
    record[1 + 2 * 1024 + 5 * 32 + 0] = 22  # blue, row 5, column 0
    (tmp_path / "one.bin").write_bytes(record.tobytes())
    x, y = cifar10.read_batch(tmp_path / "one.bin")
    assert y.tolist() == [7] and x[0, 0, 1, 0] == 11 and x[0, 5, 0, 2] == 22 and x.sum() == 33


def test_cifar_errors_name_the_file(tmp_path):
    folder = tmp_path / cifar10.FOLDER
    write_cifar(folder)
    bad = folder / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"truncated.*data_batch_3\.bin") as e:
        data.load("cifar10", root=tmp_path)
    assert "\n" not in str(e.value)

    write_cifar(folder)
    raw = bytearray((folder / "test_batch.bin").read_bytes())
    raw[cifar10.RECORD] = 12  # label of record 1
    (folder / "test_batch.bin").write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"bad label 12 in record 1 of .*test_batch\.bin"):
        data.load("cifar10", root=tmp_path)

    write_cifar(folder)
    (folder / "data_batch_5.bin").unlink()
    with pytest.raises(DatasetError, match=r"missing: .*data_batch_5\.bin"):
        data.load("cifar10", root=tmp_path)

    write_cifar(folder, meta="only\nthree\nnames\n")
    with pytest.raises(DatasetError, match=r"10 class names in .*batches\.meta\.txt"):
        data.load("cifar10", root=tmp_path)

    (folder / "data_batch_1.bin").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"data_batch_1\.bin"):
        cifar10.read_batch(folder / "data_batch_1.bin")


# ------------------------------------------------------------------ CIFAR-10 download


def make_archive(path, members):
    """Write a .tar.gz with {name: bytes} members; return its md5 and sha256."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    raw = Path(path).read_bytes()
    return hashlib.md5(raw).hexdigest(), hashlib.sha256(raw).hexdigest()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests = 0

    def do_GET(self):
        type(self).requests += 1
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/served; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    QuietHandler.requests = 0
    handler = functools.partial(QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cifar_archive(tmp_path, server):
    """A tiny cifar-10-binary.tar.gz on the local server; yields (url, md5, sha256, expected arrays)."""
    served, base = server
    source = tmp_path / "source"
    expected = write_cifar(source / cifar10.FOLDER, records_per_file=2)
    members = {f"{cifar10.FOLDER}/{p.name}": p.read_bytes() for p in sorted((source / cifar10.FOLDER).iterdir())}
    md5, sha256 = make_archive(served / "cifar.tar.gz", members)
    return f"{base}/cifar.tar.gz", md5, sha256, expected


def test_download_good_checksum(tmp_path, cifar_archive):
    url, md5, sha256, (train_x, train_y, test_x, test_y) = cifar_archive
    root = tmp_path / "root"
    got = cifar10.download(root, url=url, checksum=f"md5:{md5}", progress=False)
    assert got == root / cifar10.FOLDER
    assert [p.name for p in root.iterdir()] == [cifar10.FOLDER]  # no temporary files left
    d = data.load("cifar10", root=root)
    np.testing.assert_array_equal(d.train_x, train_x)
    np.testing.assert_array_equal(d.test_y, test_y)
    # idempotent: a second call finds the files and does not download again
    assert QuietHandler.requests == 1
    assert cifar10.download(root, url=url, checksum=f"md5:{md5}", progress=False) == got
    assert QuietHandler.requests == 1
    # sha256 and bare hex digests are accepted too
    root2 = tmp_path / "root2"
    cifar10.download(root2, url=url, checksum=sha256, progress=False)
    assert cifar10.is_complete(root2 / cifar10.FOLDER)


def test_download_bad_checksum_leaves_nothing(tmp_path, cifar_archive):
    url, md5, _, _ = cifar_archive
    root = tmp_path / "root"
    with pytest.raises(DatasetError, match="checksum mismatch") as e:
        cifar10.download(root, url=url, checksum="md5:" + "0" * 32, progress=False)
    assert md5 in str(e.value) and "\n" not in str(e.value)
    assert list(root.iterdir()) == []
    with pytest.raises(DatasetError, match="bad checksum"):
        cifar10.download(root, url=url, checksum="crc32:1234", progress=False)


def test_download_errors(tmp_path, server):
    served, base = server
    root = tmp_path / "root"
    with pytest.raises(DatasetError, match=r"could not download .*missing\.tar\.gz: HTTP 404"):
        cifar10.download(root, url=f"{base}/missing.tar.gz", checksum="0" * 32, progress=False)
    # path traversal in the archive is refused and writes nothing outside (or inside) root
    md5, _ = make_archive(served / "evil.tar.gz", {"../escaped.txt": b"x", f"{cifar10.FOLDER}/a": b"y"})
    with pytest.raises(DatasetError, match="unsafe archive member '../escaped.txt'"):
        cifar10.download(root, url=f"{base}/evil.tar.gz", checksum=md5, progress=False)
    assert not (tmp_path / "escaped.txt").exists() and list(root.iterdir()) == []
    # an archive without the CIFAR folder
    md5, _ = make_archive(served / "other.tar.gz", {"readme.txt": b"hello"})
    with pytest.raises(DatasetError, match="no complete cifar-10-batches-bin"):
        cifar10.download(root, url=f"{base}/other.tar.gz", checksum=md5, progress=False)
    # not a tar file at all
    (served / "junk.tar.gz").write_bytes(b"junk" * 100)
    with pytest.raises(DatasetError, match="cannot unpack"):
        cifar10.download(root, url=f"{base}/junk.tar.gz",
                         checksum=hashlib.md5(b"junk" * 100).hexdigest(), progress=False)
    assert list(root.iterdir()) == []


# ------------------------------------------------------------------ image folders


def save_image(path, colour, size=(40, 24), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def image_tree(tmp_path):
    """PATH/{train,test}/{cat,dog}/ with solid-colour images in several formats and sizes."""
    top = tmp_path / "pets"
    save_image(top / "train/cat/a.png", (255, 0, 0))
    save_image(top / "train/cat/b.JPG", (250, 0, 0), size=(64, 64))
    save_image(top / "train/dog/a.bmp", (0, 0, 255), size=(8, 8))
    save_image(top / "train/dog/b.gif", 40, mode="L")
    save_image(top / "train/dog/c.webp", (0, 0, 255, 128), mode="RGBA")
    save_image(top / "test/dog/x.jpeg", (0, 0, 255))
    (top / "train/cat/.DS_Store").write_bytes(b"\0junk")  # hidden files are skipped
    return top


def test_folder_reader(image_tree):
    d = data.load(f"folder:{image_tree}", progress=False)
    assert d.name == f"folder:{image_tree}" and d.classes == ["cat", "dog"]
    assert d.train_x.shape == (5, 32, 32, 3) and d.train_x.dtype == np.uint8
    assert d.train_y.dtype == np.int32 and sorted(d.train_y.tolist()) == [0, 0, 1, 1, 1]
    reds = d.train_x[d.train_y == 0]
    assert (reds[..., 0] > 240).all() and (reds[..., 2] < 10).all()
    assert d.test_x.shape == (1, 32, 32, 3) and d.test_y.tolist() == [1]  # test classes: a subset
    again = folder.load(image_tree, seed=0, progress=False)
    np.testing.assert_array_equal(again.train_x, d.train_x)  # the shuffle is fixed by the seed


@pytest.mark.parametrize("breakage, message", [
    (lambda top: (top / "train/dog/notes.txt").write_text("hi"), r"not an image file: .*notes\.txt"),
    (lambda top: (top / "train/dog/broken.png").write_bytes(b"not a png"), r"cannot read image .*broken\.png"),
    (lambda top: (top / "train/fish").mkdir(), r"empty class folder: .*fish"),
    (lambda top: save_image(top / "test/bird/x.png", (1, 2, 3)), r"test class folder .*bird has no match"),
    (lambda top: shutil.rmtree(top / "test"), r"image folder .*test not found"),
])
def test_folder_errors(image_tree, breakage, message):
    breakage(image_tree)
    with pytest.raises(DatasetError, match=message) as e:
        data.load(f"folder:{image_tree}", progress=False)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ `minasgd data`


def parse(argv):
    from minasgd.cli import datasets as cli

    parser = argparse.ArgumentParser(prog="minasgd data")
    cli.add_arguments(parser)
    return cli, parser.parse_args(argv)


def test_cli_shapes_with_preview(tmp_path, capsys):
    cli, args = parse(["shapes", "--root", str(tmp_path), "--train-size", "40", "--test-size", "10",
                       "--preview", str(tmp_path / "grid.png")])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "40 train + 10 test images" in out and "grid.png" in out
    assert shapes.cache_path(tmp_path, 0, 40, 10).is_file()
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 10 * 32 and grid.height >= 10 * 32


def test_cli_cifar_download_and_errors(tmp_path, cifar_archive, capsys):
    url, md5, _, _ = cifar_archive
    cli, args = parse(["cifar10", "--root", str(tmp_path / "root"), "--url", url, "--checksum", md5])
    assert cli.run(args) == 0
    assert "cifar10: 10 train + 2 test images" in capsys.readouterr().out
    cli, args = parse(["cifar10", "--root", str(tmp_path / "other"), "--url", url, "--checksum", "1" * 32])
    assert cli.run(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("minasgd data: error: checksum mismatch") and err.count("\n") == 1
