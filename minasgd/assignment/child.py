"""What runs in the grading child processes (`grading.py` starts them), from the throwaway copy.

Each child is started as `python -I -S -c BOOT` from the base interpreter (not a virtual
environment inside the instructor's checkout), with the grading folder first on sys.path and
only the site-packages folders `grading.clean_site_dirs` allows (no editable-install finder or
metadata of the instructor's minasgd). BOOT binds `minasgd.kernels` to the folder's kernels/
and calls one of:

    compile_check   for each kernel task of the tree, from its own folder (the modules of the
                    one before are forgotten): compile every kernel of the graded kernel files
                    that holds a solution region (all of them without `regions`) for sm_90,
                    with Numba's dead-branch pruning OFF (so no branch escapes the check), and
                    say where each kernel's source lies. Nothing of the student's code runs:
                    importing a merged file runs only instructor code (the student's lines are
                    inside functions).
    run_pytest      the grading tests of one task (the plugin in the folder's conftest.py
                    writes the outcomes)
    probe           what the child sees (sys.path, metadata, environment): tests of the isolation
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

ARCH = "sm_90"


def bind(workdir):
    """`import minasgd` finds workdir/minasgd; `minasgd.kernels` is workdir/kernels."""
    workdir = Path(workdir)
    import minasgd

    assert Path(minasgd.__file__).resolve().parent == (workdir / "minasgd").resolve(), minasgd.__file__
    spec = importlib.util.spec_from_file_location("minasgd.kernels", workdir / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(workdir / "kernels")])
    kernels = importlib.util.module_from_spec(spec)
    sys.modules["minasgd.kernels"] = kernels
    spec.loader.exec_module(kernels)
    minasgd.kernels = kernels


def _no_pruning():
    """Numba drops `if` branches whose condition it can decide at compile time (`if THREADS == 32:`
    is False here and True on the simulator); with that off, every branch must compile for the GPU."""
    from numba.cuda.core import analysis, untyped_passes

    def keep_every_branch(func_ir, called_args):
        return None

    analysis.dead_branch_prune = keep_every_branch
    untyped_passes.dead_branch_prune = keep_every_branch


def _last_line(code):
    lines = [line for _, _, line in code.co_lines() if line is not None]
    for const in code.co_consts:
        if hasattr(const, "co_lines"):
            lines.append(_last_line(const))
    return max(lines)


def _holds_a_region(row, spans):
    return any(row["first"] <= first and last <= row["last"] for first, last in spans)


def compile_check(args):
    """For each of args["jobs"] (a kernel task: its grading folder, graded files and regions),
    in order, one JSON line {"task", "kernels": [{file, name, first, last, error}], "missing":
    message or ""} on stdout, printed as soon as that task is done."""
    from numba import config

    assert not config.ENABLE_CUDASIM, "the compile check needs the simulator off"
    _no_pruning()
    for job in args["jobs"]:
        if Path(job["workdir"]).resolve() != Path(sys.path[0]).resolve():
            _rebind(job["workdir"])
        print(json.dumps(dict(_compile_job(job), task=job["task"])), flush=True)
    return 0


def _rebind(workdir):
    """Forget the previous task's folder (its minasgd and kernels modules) and bind `workdir`."""
    for name in [n for n in sys.modules if n == "minasgd" or n.startswith("minasgd.")]:
        del sys.modules[name]
    sys.path[0] = str(workdir)
    os.chdir(workdir)
    bind(workdir)


def _compile_job(job):
    from numba import cuda

    from minasgd.kernels import resources

    workdir = Path(job["workdir"]).resolve()
    files = {str((workdir / f).resolve()): f for f in job["files"]}
    regions = job.get("regions")  # {file: [[first, last], ...]}: compile only the kernels holding one
    cc = (int(ARCH[3]), int(ARCH[4]))
    rows, seen = [], set()
    for sig in resources.all_signatures():
        fn = sig.kernel.py_func
        path = str(Path(fn.__code__.co_filename).resolve())
        if path not in files:
            continue
        row = dict(file=files[path], name=fn.__name__, signature=sig.name, first=fn.__code__.co_firstlineno,
                   last=_last_line(fn.__code__), error="")
        if regions is not None and not _holds_a_region(row, regions[row["file"]]):
            continue  # instructor code only: nothing of the student's to check
        try:
            with resources.offline_device(cc):
                cuda.compile_ptx(fn, sig.argtypes, cc=cc)
        except Exception as e:  # noqa: BLE001 - the message is the result
            text = " ".join(str(e).split())
            if "nvrtc" in text.lower() or "nvvm" in text.lower() or "driver library" in text.lower():
                return {"kernels": [], "missing": f"{resources.MISSING} ({text[:200]})"}
            row["error"] = f"{type(e).__name__}: {text[:400]}"
        if (row["file"], row["signature"]) not in seen:
            seen.add((row["file"], row["signature"]))
            rows.append(row)
    return {"kernels": rows, "missing": ""}


def run_pytest(args):
    import pytest

    return pytest.main(["-q", "-p", "no:cacheprovider", *args["files"]])


def probe(args):
    """What a graded file's code could see from here (for the tests of the isolation)."""
    import importlib.metadata as md

    import minasgd

    found = []
    for dist in md.distributions():
        if (dist.metadata["Name"] or "").lower() == "minasgd":
            found.append(str(dist.read_text("direct_url.json") or dist._path))
    print(json.dumps({"sys_path": sys.path, "executable": sys.executable, "prefix": sys.prefix,
                      "environ": dict(os.environ), "minasgd": minasgd.__file__, "distributions": found,
                      "meta_path": [repr(f) for f in sys.meta_path]}))
    return 0
