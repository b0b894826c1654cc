"""Grading a student tree: the reference tests, on the instructor's code with only the student's solution regions.

For each task, `grade` builds a throwaway folder from the SOURCE checkout this command runs from
(its `minasgd/`, `kernels/`, `tests/` and `pyproject.toml`) and puts into it, in place of each
solution region of THAT task, the lines the student wrote where the stub was, and nothing else
of theirs (`markers.merge_regions`: their lines must stay inside the region's function). So
nothing a student writes runs at import time, and an edited reference, test, launcher, checker
or helper does not count, not even one in the same file as the stub.

Then one child process compiles, for each kernel task in its own folder, every kernel of the
graded files that holds a region of the task (the others are the instructor's code alone) for a
real GPU (sm_90, Numba's dead-branch pruning off, `child.compile_check`), so each region must
lie inside one of them:
code that compiles for a GPU cannot call NumPy, import, read the environment, open files or
patch a checker, so the student's code in a kernel task can do nothing on the host but
compute inside its kernel. A region that does not compile fails the
task with the compiler's message.

Then a second child runs the task's grading tests (`task_1_1`, narrowed by the task's keyword)
with the CUDA simulator on (`gpu=True`: a real GPU), and a plugin writes each test's outcome to
a JSON file; on the simulator a test that never launched a kernel holding the task's regions fails. Both children run
the base interpreter with `-I -S`, the folder first on sys.path and only site-packages folders
without the instructor's editable install (`clean_site_dirs`), in an environment stripped of
anything naming the instructor's checkout; test inputs come from a seed drawn at grading time
(MINASGD_TEST_SEED, read by the tests' `rng` fixture). Python tasks (6.1) are graded last:
their code runs on the host in that child, which only an OS sandbox can contain (docs/teaching.md).
"""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .markers import merge_regions
from .tasks import BY_ID, AssignmentError
from .tree import IGNORE, check_source_root, graded_files, source_root, template

# Started as `python -I -S -c BOOT ARGS`: the grading folder, the allowed site folders, then one child.* action.
BOOT = """
import json, os, site, sys
args = json.loads(sys.argv[1])
sys.path.insert(0, args["workdir"])
for d in args["site"]:
    site.addsitedir(d)
os.chdir(args["workdir"])
from minasgd.assignment import child
child.bind(args["workdir"])
sys.exit(getattr(child, args["action"])(args))
"""
KEEP_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
            "MKL_NUM_THREADS", "CUDA_HOME", "CUDA_PATH", "LD_LIBRARY_PATH", "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS")


@dataclass
class Grade:
    task: str
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    first_failure: str = ""

    @property
    def ok(self):
        return self.failed == 0 and self.errors == 0 and self.passed > 0

    def fail(self, message):
        self.errors, self.first_failure = max(self.errors, 1), message
        return self


# ------------------------------------------------------------------ the grading folder

def grading_dir(tree, root, workdir, task):
    """Fill workdir with the reference code and tests, and the student's regions of `task`.

    Returns {file: [(first line, last line) of each region in the merged file]}; AssignmentError
    when a stub cannot be found or the student's lines would leave the region's function.
    """
    tree, workdir = Path(tree), Path(workdir)
    for name in ("minasgd", "kernels", "tests"):
        shutil.copytree(root / name, workdir / name, ignore=IGNORE)
    shutil.copy2(root / "pyproject.toml", workdir / "pyproject.toml")
    spans = {}
    for rel in graded_files(root, [task]):
        if not (tree / rel).is_file():
            raise AssignmentError(f"{tree} has no {rel}: the student's work on task {task} lives there")
        merged, where = merge_regions((root / rel).read_text(), (tree / rel).read_text(), task, rel)
        (workdir / rel).write_text(merged)
        spans[rel] = where
    (workdir / "conftest.py").write_text(template("student_conftest.py") + "\n" + template("grading_plugin.py"))
    return spans


def test_files(workdir, tasks):
    """The test modules that carry a marker of `tasks` (pytest then collects only those)."""
    markers = [f"pytest.mark.{BY_ID[t].marker}" for t in tasks]
    return sorted(p.relative_to(workdir).as_posix() for p in (workdir / "tests").glob("test_*.py")
                  if any(m in p.read_text() for m in markers))


# ------------------------------------------------------------------ the child processes

def base_python():
    """The interpreter itself, not a virtual environment's link to it (which may live in the checkout)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _inside(path, root):
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except (ValueError, OSError):
        return False


def _minasgd_entry(name):
    low = name.lower()
    return low.startswith(("minasgd", "__editable__")) and "minasgd" in low


def clean_site_dirs(root, shadow):
    """The site-packages folders of this interpreter the children may use, minus the instructor's minasgd.

    A folder inside the checkout (its virtual environment), or one holding minasgd's editable
    finder or metadata (which name the checkout), is replaced by `shadow/N`: links to its other
    entries, so a child still finds numba or pytest installed there but not minasgd.
    """
    out = []
    for n, entry in enumerate(p for p in sys.path if p and Path(p).is_dir()):
        packages = Path(entry).name in ("site-packages", "dist-packages")
        if _inside(entry, root) and not packages:  # the checkout itself, its tests/ ...: never
            continue
        entries = os.listdir(entry)
        if not _inside(entry, root) and not any(_minasgd_entry(e) for e in entries):
            out.append(entry)
            continue
        mirror = Path(shadow) / str(n)
        mirror.mkdir(parents=True)
        for e in entries:
            if not _minasgd_entry(e) and e != "__pycache__":
                (mirror / e).symlink_to(Path(entry) / e)
        out.append(str(mirror))
    return out


def child_env(root, extra):
    """A small environment: nothing that names the instructor's checkout, plus `extra`.

    PYTEST_DISABLE_PLUGIN_AUTOLOAD: the grading run needs no plugin but its own (the folder's
    conftest.py); whatever else is installed next to pytest (xdist, hypothesis, benchmark ...)
    stays out of it, and out of its start-up time (about 1 s of every grading child here)."""
    env = {k: v for k, v in os.environ.items()
           if k in KEEP_ENV or (k.startswith("NUMBA_") and k not in ("NUMBA_CACHE_DIR", "NUMBA_ENABLE_CUDASIM"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and not _inside(p, root))
    env = {k: v for k, v in env.items() if str(root) not in v}
    env.update(extra, PYTHONDONTWRITEBYTECODE="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    return env


def run_child(action, workdir, site, env, timeout, **args):
    cmd = [base_python(), "-I", "-S", "-B", "-c", BOOT,
           json.dumps(dict(args, action=action, workdir=str(workdir), site=site))]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ the checks

def short(message):
    """One line: the failure's first line, without the simulator's 'tid=[..] ctaid=[..]: ' prefix,
    followed by the first mismatching element ('at (i, j): got .., expected ..') when the message has one."""
    lines = [l.strip() for l in (message or "").strip().splitlines() if l.strip()]
    if not lines:
        return ""
    first = lines[0]
    if "got" not in first:
        detail = next((l for l in lines[1:] if re.match(r"(first )?at [\[(]", l) and "got" in l), None)
        if detail:
            first = f"{first.rstrip(':')}: {detail}"
    return re.sub(r"tid=\[[^\]]*\] ctaid=\[[^\]]*\]: ", "", first)


def compile_regions(jobs, site, env, timeout=600):
    """{task: ('', kernels holding its regions) or (why not, in one line, [])} for `jobs`,
    {task: (grading folder, spans)}, the kernel tasks of one tree.

    One child compiles every task's kernels, folder after folder: nothing of the student's runs
    there (a merged file's import runs instructor code only), so one start of the compiler serves
    them all (about 1.7 s of CPU saved per further task). A task that child did not report on
    (it died on another task's code, or ran out of time) is checked again in a child of its own."""
    reports = _compile_child(jobs, site, env, timeout)
    for task in jobs:
        if task not in reports:
            reports.update(_compile_child({task: jobs[task]}, site, env, timeout))
    return {task: _judge(reports[task], spans) for task, (_, spans) in jobs.items()}


def _compile_child(jobs, site, env, timeout):
    """{task: the kernel rows its report lists} from one compile_check child."""
    listed = [dict(task=t, workdir=str(w), files=sorted(spans), regions=spans) for t, (w, spans) in jobs.items()]
    try:
        proc = run_child("compile_check", listed[0]["workdir"], site, env, timeout, jobs=listed)
        out, why = proc.stdout, (proc.stderr or proc.stdout).strip()[-500:]
    except subprocess.TimeoutExpired as e:
        out, why = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or "", f"timed out after {timeout} s"
    reports = {}
    for line in out.splitlines():
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if not isinstance(report, dict) or report.get("task") not in jobs:
            continue
        if report["missing"]:
            raise AssignmentError(f"grading kernel tasks needs the offline GPU compile: {report['missing']}")
        reports[report["task"]] = report["kernels"]
    if len(jobs) == 1 and not reports:  # alone, and still no report: the check itself is broken
        raise AssignmentError(f"the compile check did not run: {why}")
    return reports


def _judge(kernels, spans):
    """('', kernels holding the regions) if every region lies in a kernel that compiled; else (why not, [])."""
    homes = set()
    for rel in sorted(spans):
        for first, last in spans[rel]:
            home = [k for k in kernels if k["file"] == rel and k["first"] <= first and last <= k["last"]]
            if not home:
                return f"{rel}: your code at lines {first}-{last} is not inside a kernel that compiles", []
            bad = next((k for k in home if k["error"]), None)
            if bad:
                return f"{rel}: kernel {bad['name']} does not compile for a GPU ({bad['signature']}): {bad['error']}", []
            homes.update(k["name"] for k in home)
    return "", sorted(homes)


def run_tests(workdir, task, site, env, timeout=1800):
    """Run the grading tests of `task` in workdir in a child; returns a Grade."""
    g = Grade(task)
    out = workdir / f"grades-{secrets.token_hex(8)}.json"
    env = dict(env, MINASGD_GRADE_OUT=str(out), MINASGD_GRADE_TASKS=json.dumps({BY_ID[task].marker: BY_ID[task].keyword}))
    files = test_files(workdir, [task])
    if not files:
        return g.fail("no grading tests found for this task")
    try:
        proc = run_child("run_pytest", workdir, site, env, timeout, files=files)
    except subprocess.TimeoutExpired:
        return g.fail(f"timed out after {timeout} s")
    if not out.is_file():  # pytest stopped before running anything (an import error, say)
        lines = [l for l in (proc.stdout + proc.stderr).strip().splitlines() if "Error" in l] or ["pytest did not run"]
        return g.fail(lines[-1].strip())
    for nodeid, r in json.loads(out.read_text())["results"].items():
        if BY_ID[task].marker not in r["tasks"]:
            continue
        outcome = r["outcome"]
        if outcome == "passed":
            g.passed += 1
        elif outcome == "skipped":
            g.skipped += 1
        else:
            g.failed += outcome == "failed"
            g.errors += outcome == "error"
            if not g.first_failure:
                g.first_failure = f"{nodeid.split('::')[-1]}: {short(r['message'])}"
    if g.passed + g.failed + g.errors + g.skipped == 0:
        g.fail("no grading tests found for this task")
    return g


def prepare(tree, root, task, tmp, seed):
    """(grading folder, its environment, spans) for `task`, or the failing Grade."""
    workdir = Path(tmp) / task
    workdir.mkdir()
    env = child_env(root, {"MINASGD_TEST_SEED": str(seed), "NUMBA_CACHE_DIR": str(workdir / ".numba")})
    try:
        return workdir, env, grading_dir(tree, root, workdir, task)
    except AssignmentError as e:
        return Grade(task).fail(str(e))


def grade_prepared(task, workdir, env, spans, compiled, site, gpu):
    """Run the grading tests of a prepared task whose kernels compiled (`compiled`: its
    compile_regions result; None for a Python task)."""
    kernels = []
    if compiled is not None:
        problem, kernels = compiled
        if problem:
            return Grade(task).fail(f"not GPU code: {problem}")
    env["MINASGD_GRADE_FILES"] = json.dumps([] if BY_ID[task].host else sorted(spans))
    env["MINASGD_GRADE_KERNELS"] = json.dumps(kernels)
    if gpu:
        env.update(MINASGD_TEST_GPU="1")
    else:
        env.update(NUMBA_ENABLE_CUDASIM="1")
    return run_tests(workdir, task, site, env)


def grade(tree, tasks, root=None, gpu=False, seed=None):
    """Grade `tasks` of a student tree against the reference tests and code; returns [Grade].

    Each task in its own folder and child processes, kernel tasks first and Python tasks last
    (their code runs on the host: nothing graded runs after it). `seed` (default: drawn now)
    seeds the tests' inputs.
    """
    root = check_source_root(root or source_root())
    tree = Path(tree)
    for name in ("minasgd", "kernels"):
        if not (tree / name).is_dir():
            raise AssignmentError(f"{tree} has no {name}/ folder: not a minasgd student tree")
    if tree.resolve() == root.resolve():
        raise AssignmentError(f"{tree} is the source checkout {root}: grade a student tree made by `make`")
    seed = secrets.randbelow(2**31) if seed is None else seed
    grades = {}
    with tempfile.TemporaryDirectory(prefix="minasgd-grade-") as tmp:
        site = clean_site_dirs(root, Path(tmp) / "site")
        order = sorted(tasks, key=lambda t: BY_ID[t].host)
        prepared = {t: prepare(tree, root, t, tmp, seed) for t in order}
        grades.update((t, p) for t, p in prepared.items() if isinstance(p, Grade))
        kernel_jobs = {t: (p[0], p[2]) for t, p in prepared.items() if t not in grades and not BY_ID[t].host}
        compiled = {}
        if kernel_jobs:
            compiled = compile_regions(kernel_jobs, site, prepared[next(iter(kernel_jobs))][1])
        for task in order:
            if task not in grades:
                grades[task] = grade_prepared(task, *prepared[task], compiled.get(task), site, gpu)
    for g in grades.values():
        need = BY_ID[g.task].needs
        if not g.ok and need in grades and not grades[need].ok:
            g.first_failure = f"(needs task {need}, which fails too) {g.first_failure}"
    return [grades[t] for t in tasks]
