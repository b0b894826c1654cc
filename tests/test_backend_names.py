"""Each backend says which one it is: `be.NAME` is the name `backends.get` takes for it, so
summary.json, a worker's HELLO and the benchmarks tell the reference from the fast path."""

import pytest

from minasgd import backends


@pytest.mark.parametrize("name", ["numpy", "numpy-reference"])
def test_a_backend_is_named_by_what_gets_it(name):
    assert backends.get(name).NAME == name


def test_the_two_numpy_backends_have_distinct_names_and_devices():
    fast, ref = backends.get("numpy"), backends.get("numpy-reference")
    assert fast is not ref and fast.NAME != ref.NAME and fast.DEVICE != ref.DEVICE


def test_no_dead_name_lists():
    assert not hasattr(backends, "NAMES")  # a list of backend names nobody read, missing two of them
