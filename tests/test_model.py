"""The model: one flat parameter vector with layer views, shapes, gradients, and learning."""

import json

import numpy as np
import pytest

from minasgd import backends, checkpoint
from minasgd.model import Model
from minasgd.optim import SGD, learning_rate


@pytest.fixture
def numpy_be():
    return backends.get("numpy")


def test_alexnet_mini_layout(numpy_be):
    model = Model("alexnet-mini", numpy_be)
    assert model.num_params == 425_290
    info = model.describe()
    assert [l["out_shape"] for l in info["layers"] if l["type"] == "maxpool"] == [[32, 15, 15], [64, 7, 7], [128, 3, 3]]
    assert info["layers"][-1]["out_shape"] == [10]
    assert sum(l.get("params", 0) for l in info["layers"]) == model.num_params
    json.dumps(info)  # serialisable


def test_layer_parameters_are_views_of_the_flat_vector(numpy_be):
    model = Model("tiny", numpy_be)
    conv1 = model.layers[0]
    assert np.shares_memory(conv1.params["w"], model.params)
    assert np.shares_memory(conv1.grads["w"], model.grads)
    model.params[:] = 0.0
    assert not conv1.params["w"].any()
    # the slots tile the vector exactly, in order
    end = 0
    for _, _, off, shape in model.slots:
        assert off == end
        end += int(np.prod(shape))
    assert end == model.num_params


def test_init_is_deterministic_from_seed(numpy_be):
    a, b, c = (Model("tiny", numpy_be, seed=s).get_params() for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32


def test_forward_backward_shapes(numpy_be, rng):
    model = Model("tiny", numpy_be)
    x = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    logits = model.forward(x, train=True)
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    assert model.backward(np.ones_like(logits)) is None  # the first layer skips its input gradient
    assert model.grads.any()
    with pytest.raises(ValueError, match="expects images of shape"):
        model.forward(np.zeros((1, 3, 16, 16), np.float32))


def test_whole_model_gradient_matches_finite_differences(numpy_be, rng):
    """Directional derivative of the training loss (fixed dropout mask) vs the analytic gradient."""
    model = Model("micro", numpy_be, seed=3)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = np.array([0, 3, 7, 9], np.int32)
    loss = float(model.loss_and_grad(x, y, step=5)[0])
    grad = model.grads.astype(np.float64)
    base = model.get_params()
    for trial in range(3):
        d = np.random.default_rng(trial).standard_normal(model.num_params).astype(np.float32)
        d /= np.linalg.norm(d)
        eps = 1e-2
        values = []
        for sign in (1, -1):
            model.set_params(base + sign * eps * d)
            values.append(float(model.loss_and_grad(x, y, step=5)[0]))
        numeric = (values[0] - values[1]) / (2 * eps)
        analytic = float(grad @ d)
        assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 2e-3, (numeric, analytic)
    assert np.isfinite(loss)


def test_a_few_steps_reduce_the_loss(numpy_be, rng):
    model = Model("tiny", numpy_be, seed=0)
    x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    opt = SGD(numpy_be, model.num_params, momentum=0.9)
    first = float(model.loss_and_grad(x, y, 0)[0])
    for step in range(30):
        model.loss_and_grad(x, y, step)
        opt.step(model.params, model.grads, 0.05)
    last = float(model.loss_and_grad(x, y, 99)[0])
    assert last < 0.5 * first


def test_fingerprint_identifies_the_architecture(numpy_be):
    a = Model("tiny", numpy_be, seed=0).fingerprint()
    assert a == Model("tiny", numpy_be, seed=1).fingerprint()  # weights do not matter
    assert a != Model("micro", numpy_be).fingerprint()
    assert a.startswith("tiny:")


def test_unknown_model_is_a_clear_error(numpy_be):
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        Model("resnet", numpy_be)


def test_learning_rate_schedule():
    assert learning_rate(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert learning_rate(10, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert learning_rate(100, 100, 1.0, warmup_steps=10) == pytest.approx(0.0)
    assert 0 < learning_rate(55, 100, 1.0, warmup_steps=10) < 1


def test_checkpoint_round_trip_and_errors(numpy_be, tmp_path):
    model = Model("tiny", numpy_be, seed=4)
    path = checkpoint.save(tmp_path / "m.npz", model.name, model.fingerprint(), model.get_params(), {"steps": 7})
    ckpt = checkpoint.load(path, expect_fingerprint=model.fingerprint())
    np.testing.assert_array_equal(ckpt["params"], model.get_params())
    assert ckpt["meta"] == {"steps": 7}
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind

    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing.npz")
    with pytest.raises(checkpoint.CheckpointError, match="is for model"):
        checkpoint.load(path, expect_fingerprint=Model("micro", numpy_be).fingerprint())
    bad = tmp_path / "bad.npz"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable"):
        checkpoint.load(bad)


def test_interrupted_checkpoint_write_keeps_the_previous_one(numpy_be, tmp_path, monkeypatch):
    model = Model("tiny", numpy_be)
    path = checkpoint.save(tmp_path / "m.npz", model.name, model.fingerprint(), model.get_params())

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, model.name, model.fingerprint(), np.zeros(model.num_params, np.float32))
    monkeypatch.undo()
    np.testing.assert_array_equal(checkpoint.load(path)["params"], model.get_params())
    assert list(tmp_path.iterdir()) == [path]
