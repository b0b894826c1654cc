"""Every kernel compiled for real GPUs (sm_70, sm_80, sm_90) on a machine without one.

Each kernel module declares what its launchers pass (`signatures()`: kernel, argument types,
threads per block, every tile size in use). Two simulator tests keep the declarations honest:
whatever the launchers really pass (recorded from launches, including the benchmarks' at every
tile size) must be declared, and every `@cuda.jit` kernel in the sources must be declared and
launched. Then one child process, with the simulator off, compiles every declaration with NVVM
and assembles it with `ptxas -v` (kernels/resources.py), and the test asserts: it compiles, no
float64 instruction, no spills, registers x threads fit the register file, static shared
memory <= 48 KB.

The compile needs NVVM and ptxas (`pip install -e ".[gpu-compile]"`, ~130 MB). Without them the
compile test skips with one line; CI installs them and sets MINASGD_REQUIRE_PTXAS=1, which turns
that skip into a failure.
"""

import os

import numba
import numpy as np
import pytest

from kernel_workload import KERNEL_MODULES, every_kernel, kernel_names
from minasgd import bench_kernels
from minasgd.kernels import resources
from minasgd.kernels.common import TILES


def record_launches(fn):
    """Run fn() with kernel launches recorded, not executed: {(label, argument types)}."""
    from numba.cuda.simulator import kernel

    seen = set()
    launch = kernel.FakeCUDAKernel.__call__

    def record(self, *args):
        if self._device or kernel._get_kernel_context() is not None:
            return launch(self, *args)
        block = tuple(self.block_dim)
        label = self.fn.__name__ + (f" {block[0]}x{block[1]}" if block[1] > 1 else "")
        seen.add((label, tuple(numba.typeof(a) for a in args)))

    kernel.FakeCUDAKernel.__call__ = record
    try:
        fn()
    finally:
        kernel.FakeCUDAKernel.__call__ = launch
    return seen


def declared():
    return {(s.name, tuple(s.argtypes)) for s in resources.all_signatures()}


def test_launchers_pass_exactly_the_declared_types():
    """The backend's step and every benchmark case, at every tile size, launch declared signatures only."""
    def workload():
        for tile in TILES:  # recorded, not run: cheap at every tile (gemm v3 is not in the benchmarks)
            every_kernel(np.random.default_rng(0), tile=tile)
        for tile in (None, *TILES):
            for case in bench_kernels.build_cases("micro", batch=2, tile=tile):
                case.ours()
                if case.alt is not None:
                    case.alt()

    launched = record_launches(workload)
    undeclared = launched - declared()
    assert not undeclared, "launches with types no signatures() declares:\n" + "\n".join(
        f"  {label}{tuple(str(t) for t in types)}" for label, types in sorted(undeclared, key=str))
    never = {name for name, _ in declared()} - {label for label, _ in launched}
    assert not never, f"declared but never launched by the code or the benchmarks: {sorted(never)}"


def test_every_kernel_is_declared():
    """A new @cuda.jit kernel cannot escape the compile check: it must have a signature."""
    names = {s.kernel.py_func.__name__ for s in resources.all_signatures()}
    missing = kernel_names(KERNEL_MODULES) - names
    assert not missing, f"kernels without a signatures() entry (so never compiled for a GPU): {sorted(missing)}"


@pytest.fixture(scope="module")
def compiled():
    try:
        return resources.report()
    except resources.ToolchainMissing as e:
        if os.environ.get("MINASGD_REQUIRE_PTXAS") == "1":
            pytest.fail(f"MINASGD_REQUIRE_PTXAS=1 but {e}")
        pytest.skip(str(e))


def test_every_kernel_compiles_for_real_gpus(compiled):
    assert {(r["name"], r["arch"]) for r in compiled} == {
        (s.name, a) for s in resources.all_signatures() for a in resources.ARCHS}
    required = os.environ.get("MINASGD_REQUIRE_PTXAS") == "1"
    # An arch the installed toolkit no longer compiles for (CUDA 13 dropped sm_70) says nothing about
    # the kernels: the other archs are still checked, then the test skips, naming it (CI fails instead).
    lacking = sorted({r["arch"] for r in compiled if r.get("toolkit_lacks_arch")}) if not required else []
    checked = [r for r in compiled if r["arch"] not in lacking]
    bad = [f"{r['name']} on {r['arch']}: {'; '.join(resources.problems(r))}" for r in checked if resources.problems(r)]
    assert not bad, "kernels that fail on a real GPU:\n" + "\n".join(bad)
    if lacking:
        pytest.skip(f"the CUDA toolkit found does not compile for {', '.join(lacking)} (CUDA 13 dropped sm_70); "
                    "the CUDA 12 one CI uses does: pip install -e \".[gpu-compile]\"")


# Run with the simulator off: ptx_for_archs' PTX against compile_ptx's, arch by arch, for a kernel with
# shared memory and launch bounds (the tiled conv).
SAME_PTX = """
import json, re, sys
from numba import cuda
from minasgd.kernels import resources as r
names = ("conv2d_forward_tiled 8x8",)
def norm(ptx):  # the names Numba numbers per compile (mangled functions, shared arrays)
    return re.sub(r"_cudapy_smem_\\d+", "SMEM", re.sub(r"_ZN\\w+", "NAME", ptx))
out = []
for sig in [s for s in r.all_signatures() if s.name in names]:
    once = r.ptx_for_archs(sig, r.ARCHS)
    for arch in r.ARCHS:
        cc = (int(arch[3]), int(arch[4]))
        try:
            with r.offline_device(cc):
                alone = cuda.compile_ptx(sig.kernel.py_func, sig.argtypes, cc=cc,
                                         launch_bounds=sig.kernel.targetoptions.get("launch_bounds"))[0]
        except Exception as e:
            print(json.dumps({"missing": str(e)[:300]}))
            sys.exit(0)
        out.append([sig.name, arch, isinstance(once[arch], str) and norm(once[arch]) == norm(alone)])
print(json.dumps({"missing": "", "same": out}))
"""


def test_one_front_end_for_every_arch_gives_compile_ptx_s_ptx():
    """The compile check lowers each kernel once and runs NVVM per arch (`ptx_for_archs`, half the
    time of a compile_ptx per arch): the PTX must be compile_ptx's, arch by arch."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", SAME_PTX], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["missing"]:
        if os.environ.get("MINASGD_REQUIRE_PTXAS") == "1":
            pytest.fail(f"MINASGD_REQUIRE_PTXAS=1 but {result['missing']}")
        pytest.skip(result["missing"])
    assert len(result["same"]) == len(resources.ARCHS)
    assert all(same for _, _, same in result["same"]), result["same"]


# ---------------------------------------------------------------- the checks can fail

def test_problems_flags_each_failure():
    ok = dict(registers=40, threads=256, smem=2048, spill_stores=0, spill_loads=0, f64=0)
    assert resources.problems(ok) == []
    assert "float64" in resources.problems({**ok, "f64": 5})[0]
    assert "spills" in resources.problems({**ok, "spill_stores": 8})[0]
    assert "registers" in resources.problems({**ok, "registers": 70, "threads": 1024})[0]
    assert "48 KB" in resources.problems({**ok, "smem": 49 * 1024 + 4})[0]
    assert resources.problems({"error": "ptxas: boom"}) == ["ptxas: boom"]


def test_parse_ptxas_and_count_f64():
    text = """ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    0 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 38 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]"""
    assert resources.parse_ptxas(text) == dict(registers=38, smem=2048, stack=0, spill_stores=12, spill_loads=8)
    ptx = "\tmul.f32 %f1, %f2, %f3;\n\tcvt.f64.f32 %fd1, %f1; // widen\n// .f64 in a comment only\n"
    assert resources.count_f64(ptx) == 1


def test_occupancy_limits():
    # 32 regs x 256 threads: 8 blocks of 8 warps fill the 64 warps.
    assert resources.occupancy(32, 0, 256, "sm_80")["occupancy"] == 1.0
    # 64 registers: a warp needs 2048 of 65,536, so 32 warps -> 50%, limited by registers.
    occ = resources.occupancy(64, 2048, 256, "sm_90")
    assert (occ["active_warps"], occ["limit"]) == (32, "registers")
    # 40 KB of shared memory per block: 4 blocks fit in 164 KB (sm_80), 5 in 228 KB (sm_90).
    assert resources.occupancy(16, 40 * 1024, 64, "sm_80")["blocks_per_sm"] == 4
    assert resources.occupancy(16, 40 * 1024, 64, "sm_90")["blocks_per_sm"] == 5
    # tiny blocks hit the 32-blocks-per-SM limit: 32 blocks of one warp = 50%.
    assert resources.occupancy(16, 0, 32, "sm_80") == dict(
        blocks_per_sm=32, active_warps=32, max_warps=64, occupancy=0.5, limit="blocks")


# ---------------------------------------------------------------- minasgd bench kernels --static

def test_static_table_has_every_kernel(compiled, monkeypatch, capsys):
    """The table and JSON from the rows compiled above (no second compile)."""
    from minasgd import cli

    archs = bench_kernels.STATIC_ARCHS
    monkeypatch.setattr(resources, "report", lambda a: [r for r in compiled if r["arch"] in a])
    assert cli.main(["bench", "kernels", "--static", "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert [r["kernel"] for r in result["kernels"]] == [s.name for s in resources.all_signatures()]
    for row in result["kernels"]:
        for arch in archs:
            p = row["archs"][arch]
            assert 0 < p["occupancy"] <= 1 and p["limit"] in ("blocks", "warps", "registers", "smem")
    monkeypatch.setenv("COLUMNS", "200")  # one line per row
    assert cli.main(["bench", "kernels", "--static"]) == 0
    out = capsys.readouterr().out
    assert "occupancy sm_90" in out
    for s in resources.all_signatures():
        assert s.name in out


def test_static_without_the_compiler_says_so_in_one_line(monkeypatch, capsys):
    from minasgd import cli

    def missing(archs):
        raise resources.ToolchainMissing(resources.MISSING)

    monkeypatch.setattr(resources, "report", missing)
    assert cli.main(["bench", "kernels", "--static"]) == 2
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "gpu-compile" in out
