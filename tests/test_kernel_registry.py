"""The kernel registry (`minasgd.kernels.registry`) is the one list of ops: every family module
declares its versions and cases, and what each declares is real (launchers exist and say which
kernel they launch, every version has a case, one default per op, the backend uses the defaults)."""

import inspect

import pytest

from minasgd.backends import numpy_backend as ref
from minasgd.kernels import registry

from kernel_workload import TINY


@pytest.fixture(scope="module")
def cases():
    return registry.cases(TINY, ref, (4,))


@pytest.mark.parametrize("family", registry.FAMILIES)
def test_a_family_declares_everything_the_loops_need(family):
    m = registry.module(family)
    assert callable(m.cases) and callable(m.signatures) and m.VERSIONS_OF
    assert 'if __name__ == "__main__":' in inspect.getsource(m)  # its workbench
    for op, versions in m.VERSIONS_OF.items():
        assert callable(getattr(m, op)), f"{family}: VERSIONS_OF names {op}, which the module lacks"
        assert [v.default for v in versions].count(True) == 1, f"{op}: exactly one default version"
        assert len({v.name for v in versions}) == len(versions)
        for v in versions:
            assert v.op == op and callable(getattr(m, v.launcher, None)), f"{op} {v.name}: no {v.launcher}"
            if len(versions) > 1:  # the launcher's name says which kernel it launches
                assert v.name.split("_")[0] in v.launcher, f"{op} {v.name}: launcher {v.launcher}"


def uncovered(cases):
    """{family: (versions without a case, cases of no version)} where they differ."""
    out = {}
    for family in registry.FAMILIES:
        declared = {v.name for v in registry.versions((family,))}
        covered = {c.version for c in cases if c.family == family}
        if declared != covered:
            out[family] = (declared - covered, covered - declared)
    return out


def test_every_version_has_a_case_and_every_case_a_version(cases):
    assert uncovered(cases) == {}


def test_cases_are_plain_data_with_one_launch(cases):
    """What another loop (a benchmark, a profiler) relies on."""
    labels = [c.label for c in cases]
    assert len(labels) == len(set(labels)), "labels must be unique"
    for c in cases:
        assert c.family in registry.FAMILIES and c.name and callable(c.launch) and c.work > 0
        assert c.unit in ("GFLOP/s", "GB/s") and c.shapes and all(isinstance(s, tuple) for s in c.shapes.values())


def test_the_backend_uses_the_declared_defaults():
    from minasgd.backends import cuda_backend

    assert registry.default_version("conv2d_forward").name == cuda_backend.CONV_VERSION
    assert registry.default_version("gemm").name == cuda_backend.GEMM_VERSION
    assert registry.default_version("maxpool2d_backward").name == cuda_backend.POOL_BACKWARD_VERSION


def test_an_unknown_version_is_one_line_naming_the_choices():
    from minasgd.kernels import pool

    with pytest.raises(ValueError, match=r"maxpool2d_backward: unknown version 'fast'; choose one of \('scatter', 'gather'\)"):
        pool.maxpool2d_backward(None, None, (1, 1, 3, 3), version="fast")
    with pytest.raises(ValueError, match="needs the window size and stride"):
        pool.maxpool2d_backward(_Shaped((1, 1, 1, 1)), _Shaped((1, 1, 1, 1)), (1, 1, 3, 3), version="gather")


class _Shaped:
    def __init__(self, shape):
        self.shape = shape


def test_the_check_catches_a_planted_version_without_a_case(monkeypatch):
    """A module whose cases() forgets a version (here conv's gather) is named."""
    from minasgd.kernels import conv

    real = conv.cases
    monkeypatch.setattr(conv, "cases", lambda *args: [c for c in real(*args) if c.version != "gather"])
    assert uncovered(registry.cases(TINY, ref, (4,), families=("conv",)))["conv"] == ({"gather"}, set())


def kernel_modules_on_disk():
    """The modules of kernels/ that define a `@cuda.jit` function, by name."""
    import re
    from pathlib import Path

    here = Path(registry.__file__).parent
    return sorted(p.stem for p in here.glob("*.py") if re.search(r"^\s*@cuda\.jit", p.read_text(), re.M))


def test_no_kernel_module_escapes_the_registry():
    """An attack on the registry: a new kernels/*.py with kernels but left out of FAMILIES would
    escape the workbench, the benchmark, the compile check and the race check. It cannot."""
    assert set(kernel_modules_on_disk()) <= {*registry.FAMILIES, registry.COMMON}
    assert {m.__name__.rpartition(".")[2] for m in registry.modules()} == {*registry.FAMILIES, registry.COMMON}


def test_the_escape_check_sees_a_planted_module(tmp_path, monkeypatch):
    from pathlib import Path

    planted = Path(registry.__file__).parent / "zz_planted_batchnorm.py"
    planted.write_text("from numba import cuda\n\n\n@cuda.jit\ndef batchnorm_kernel(x):\n    pass\n")
    try:
        assert "zz_planted_batchnorm" in kernel_modules_on_disk()
        assert not set(kernel_modules_on_disk()) <= {*registry.FAMILIES, registry.COMMON}
    finally:
        planted.unlink()
