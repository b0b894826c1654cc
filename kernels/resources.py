"""What each kernel costs the hardware, found without a GPU: compile for real GPUs, read ptxas's report.

For every launch the launchers make (each module's `signatures()`: kernel, argument types, threads
per block), Numba turns the kernel into PTX for each compute capability (`ptx_for_archs`: what
`numba.cuda.compile_ptx` does, the arch-independent half once; NVVM, no driver needed) and
`ptxas -v` assembles it for that GPU and reports:

    registers   per thread. An SM has 65,536; a block of T threads needs about regs x T of them
                (rounded up to 256 per warp), so heavy kernels fit fewer blocks at once.
    smem        static shared memory per block (the tiles of the tiled kernels: 2 x T x T x 4 bytes).
                At most 48 KB static per block; an SM has 164 KB (sm_80) or 228 KB (sm_90) for all
                its blocks, minus 1 KB per block that CUDA reserves.
    spills      bytes stored to / loaded from slow local memory because registers ran out. Want 0.
    f64         float64 instructions in the PTX: a Python float literal (`x * 0.5`) promotes the
                arithmetic to float64, 30-60x slower on consumer GPUs. Want 0.

Theoretical occupancy is how many warps an SM can keep resident, over its maximum (64 warps =
2,048 threads on sm_70/80/90). Blocks per SM is the smallest of four limits: 32 blocks; 64 warps /
warps per block; the register file / registers per block; shared memory / shared memory per block.
The smallest one is the `limit` reported. Low occupancy is not always slow (a tiled GEMM hides
latency with its own reuse), but a kernel at 25% because of registers is one to look at.

This needs NVVM and ptxas: the `nvidia-cuda-nvcc-cu12` and `nvidia-cuda-nvrtc-cu12` wheels
(`pip install -e ".[gpu-compile]"`, ~130 MB) or a CUDA toolkit. The simulator must be off in the
compiling process: `report()` runs the compile in a child process when NUMBA_ENABLE_CUDASIM is set.

    python -m minasgd.kernels.resources          # JSON rows on stdout (simulator off)
"""

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

ARCHS = ("sm_70", "sm_80", "sm_90")

# Per-SM limits (CUDA C Programming Guide, "Compute capabilities"; occupancy calculator).
LIMITS = {
    "sm_70": dict(max_warps=64, max_blocks=32, regs=65536, smem=96 * 1024, smem_reserved=0),
    "sm_80": dict(max_warps=64, max_blocks=32, regs=65536, smem=164 * 1024, smem_reserved=1024),
    "sm_90": dict(max_warps=64, max_blocks=32, regs=65536, smem=228 * 1024, smem_reserved=1024),
}
REG_ALLOC_UNIT = 256  # registers are given to a warp in chunks of 256
WARP_ALLOC_GRANULARITY = 4  # ... and to an SM's four schedulers in groups of 4 warps
SMEM_ALLOC_UNIT = 128  # shared memory per block is rounded up to 128 bytes
MAX_STATIC_SMEM = 48 * 1024
REGISTER_FILE = 65536


class ToolchainMissing(RuntimeError):
    """NVVM or ptxas is not installed; the message says what to install."""


MISSING = ("the offline compile for real GPUs needs NVVM and ptxas: pip install -e \".[gpu-compile]\" "
           "(the nvidia-cuda-nvcc-cu12 and nvidia-cuda-nvrtc-cu12 wheels, ~130 MB) or a CUDA 12 toolkit")


def all_signatures():
    """Every `common.Signature` of every kernel module, in the registry's order (`registry.signatures`)."""
    from . import registry

    return registry.signatures()


def ptxas_path():
    """ptxas from the nvidia-cuda-nvcc wheel, else from CUDA_HOME or PATH; None if there is none."""
    try:
        import nvidia.cuda_nvcc as nvcc

        for root in nvcc.__path__:
            path = os.path.join(root, "bin", "ptxas")
            if os.path.exists(path):
                return path
    except ImportError:
        pass
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "ptxas")):
        return os.path.join(home, "bin", "ptxas")
    return shutil.which("ptxas")


@contextlib.contextmanager
def _offline_device(cc):
    """Typing a call to a device function asks the current GPU for its compute capability;
    with no GPU that fails ("CUDA driver library cannot be found"). Answer with the target's."""
    from numba.cuda import dispatcher

    class Device:
        compute_capability = cc

    saved = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: Device()
    try:
        yield
    finally:
        dispatcher.get_current_device = saved


offline_device = _offline_device  # public: the assignment grader's compile check uses it too


def count_f64(ptx):
    """float64 instructions in PTX (comments stripped)."""
    return sum(".f64" in line.split("//")[0] for line in ptx.splitlines())


def parse_ptxas(text):
    """registers, smem, stack, spill_stores, spill_loads from `ptxas -v` output for one kernel."""
    def num(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return dict(registers=num(r"Used (\d+) registers"), smem=num(r"(\d+) bytes smem"),
                stack=num(r"(\d+) bytes stack frame"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"))


def occupancy(registers, smem, threads, arch):
    """Theoretical occupancy on one SM: blocks, active warps, fraction of the maximum, and the limit."""
    lim = LIMITS[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    warps_by_regs = lim["regs"] // regs_per_warp // WARP_ALLOC_GRANULARITY * WARP_ALLOC_GRANULARITY
    smem_per_block = math.ceil((smem + lim["smem_reserved"]) / SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    by = {
        "blocks": lim["max_blocks"],
        "warps": lim["max_warps"] // warps,
        "registers": warps_by_regs // warps,
        "smem": lim["smem"] // smem_per_block if smem_per_block else lim["max_blocks"],
    }
    limit = min(by, key=by.get)
    blocks = by[limit]
    return dict(blocks_per_sm=blocks, active_warps=blocks * warps, max_warps=lim["max_warps"],
                occupancy=blocks * warps / lim["max_warps"], limit=limit)


def ptx_for_archs(sig, archs):
    """{arch: PTX text, or the exception compiling for it raised} for one signature.

    Numba's front end (typing, then lowering to NVVM IR) is most of a compile; only NVVM, which
    turns that IR into PTX, needs the arch. So the IR is made once, for the first arch, and NVVM
    runs once per arch (`CUDACodeLibrary.get_asm_strs(cc)`, as `cuda.compile_ptx` calls it). The
    lowering itself reads the compute capability in two places only: float64 atomic adds below
    6.0 (none of ARCHS) and tanh under fastmath from 7.5 on. A kernel compiled with fastmath, or
    a numba-cuda without `_compile_pyfunc_with_fixup` (compile_ptx's own first half), gets the
    public `cuda.compile_ptx` once per arch instead: the same PTX, three times the work."""
    from numba import cuda
    from numba.cuda import compiler

    fn, options = sig.kernel.py_func, getattr(sig.kernel, "targetoptions", {})
    bounds = options.get("launch_bounds")  # as the kernel's cuda.jit says
    ccs = {arch: (int(arch[3]), int(arch[4])) for arch in archs}
    lower = getattr(compiler, "_compile_pyfunc_with_fixup", None)
    out = {}
    if lower is None or options.get("fastmath"):
        for arch, cc in ccs.items():
            try:
                with _offline_device(cc):
                    out[arch] = cuda.compile_ptx(fn, sig.argtypes, cc=cc, launch_bounds=bounds)[0]
            except Exception as e:  # noqa: BLE001 - the message is the result
                out[arch] = e
        return out
    from numba.core.compiler_lock import global_compiler_lock

    first = ccs[archs[0]]
    try:
        with global_compiler_lock, _offline_device(first):
            library, _ = lower(fn, sig.argtypes, device=False, abi="numba", cc=first, launch_bounds=bounds)
    except Exception as e:  # noqa: BLE001 - every arch fails the same way
        return {arch: e for arch in archs}
    for arch, cc in ccs.items():
        try:
            with global_compiler_lock:
                (out[arch],) = library.get_asm_strs(cc=cc)
        except Exception as e:  # noqa: BLE001
            out[arch] = e
    return out


def compile_one(sig, archs, ptxas):
    """Compile one signature for each arch: a row of numbers (or an `error`) per arch."""
    return [_row(sig, arch, ptx, ptxas) for arch, ptx in ptx_for_archs(sig, archs).items()]


def _row(sig, arch, ptx, ptxas):
    row = dict(name=sig.name, version=sig.version, kernel=sig.kernel.py_func.__name__, arch=arch,
               threads=sig.threads, argtypes=[str(t) for t in sig.argtypes])
    if isinstance(ptx, Exception):
        e = ptx
        text = " ".join(str(e).split())
        if "nvrtc" in text.lower() or "nvvm" in text.lower() or "driver library" in text.lower():
            raise ToolchainMissing(f"{MISSING} ({text[:200]})") from e
        row["error"] = f"compile_ptx: {type(e).__name__}: {text[:500]}"
        if type(e).__name__ == "CCSupportError":  # e.g. CUDA 13 dropped sm_70: the toolkit's limit, not the kernel's
            row["toolkit_lacks_arch"] = True
        return row
    row["f64"] = count_f64(ptx)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        done = subprocess.run([ptxas, f"-arch={arch}", "-v", f.name, "-o", os.devnull],
                              capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        row["error"] = "ptxas: " + " ".join(done.stderr.split())[:500]
        return row
    row.update(parse_ptxas(done.stdout + done.stderr))
    row.update(occupancy(row["registers"], row["smem"], sig.threads, arch))
    return row


def compile_all(archs=ARCHS):
    """Every signature compiled for every arch, in this process (the simulator must be off)."""
    from numba import config

    if config.ENABLE_CUDASIM:
        raise RuntimeError("compile_all needs the simulator off: use report(), which starts a child process")
    ptxas = ptxas_path()
    if ptxas is None:
        raise ToolchainMissing(MISSING + " (no ptxas found)")
    return [row for sig in all_signatures() for row in compile_one(sig, tuple(archs), ptxas)]


def report(archs=ARCHS):
    """`compile_all(archs)`, in a child process with the simulator off when this one runs it."""
    from numba import config

    if not config.ENABLE_CUDASIM:
        return compile_all(archs)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-m", "minasgd.kernels.resources", *archs],
                          capture_output=True, text=True, env=env)
    if done.returncode == 3:
        raise ToolchainMissing(done.stderr.strip().splitlines()[-1])
    if done.returncode != 0:
        raise RuntimeError(f"offline compile failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def problems(row):
    """What is wrong with one compiled row, as short strings (empty: it passes every check)."""
    if "error" in row:
        return [row["error"]]
    out = []
    if row["f64"]:
        out.append(f"{row['f64']} float64 instructions")
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills ({row['spill_stores']} bytes stored, {row['spill_loads']} loaded)")
    if row["registers"] * row["threads"] > REGISTER_FILE:
        out.append(f"{row['registers']} registers x {row['threads']} threads > {REGISTER_FILE}")
    if row["smem"] > MAX_STATIC_SMEM:
        out.append(f"{row['smem']} bytes of static shared memory > 48 KB")
    return out


def main(argv=None):
    archs = tuple(argv if argv is not None else sys.argv[1:]) or ARCHS
    try:
        rows = compile_all(archs)
    except ToolchainMissing as e:
        print(e, file=sys.stderr)
        return 3
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
