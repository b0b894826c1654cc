"""Course assignments cut from the real code, and graded by the real tests.

    minasgd assignment list                              the tasks, their files and grading tests
    minasgd assignment make OUTDIR --tasks 1.1,2.1       a student tree with those tasks stubbed out
    minasgd assignment grade OUTDIR [--tasks ...]        run each task's grading tests: a table
    minasgd assignment restore OUTDIR [--tasks ...]      put the reference solutions back (answer key)

Marking a solution in the source
--------------------------------
A solution region is a block of ordinary code between two comment lines at the same
indentation as the code:

    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    # BEGIN SOLUTION task 1.1: grid-stride loop over i < x.size: y[i] = max(x[i], 0)
    for i in range(start, x.size, stride):
        ...
    # END SOLUTION

The text after the colon is the hint the student sees (one line). Markers are comments, so the
reference code runs unchanged. Regions do not nest; a task may have several regions, in one
file or several. Keep the set-up a student should start from (thread indices, shared arrays)
OUTSIDE the region, the way minitorch's task stubs keep the set-up and drop the body.

Cutting a student tree (`make`)
-------------------------------
The source checkout's `minasgd/`, `kernels/`, `tests/`, `pyproject.toml` and `README.md` are
copied to OUTDIR (no .git, runs/, data/, caches). In every copied file, each region of a
selected task becomes, at the region's indentation,

    # TODO(task 1.1): grid-stride loop over i < x.size: y[i] = max(x[i], 0)
    raise NotImplementedError("task 1.1: ReLU forward and backward kernels")

and regions of the other tasks keep their code (their marker lines are dropped). A stubbed
module still imports, so every test still collects; only calling a stubbed function fails. A
stubbed kernel raises when launched on the CUDA simulator (which runs it as Python); on a real
GPU exceptions in kernels are ignored, the output stays unwritten and the tests, which pre-fill
outputs with NaN, fail. OUTDIR also gets ASSIGNMENT.md (the tasks, files and test commands),
`.assignment.json` (which tasks are stubbed) and a root `conftest.py` that makes the tree's own
code the one imported (even where another copy of minasgd is installed).

Grading (`grade`)
-----------------
Each task has grading tests: the repository's existing tests that carry the task's pytest
marker (`task_1_1`), optionally narrowed by a `-k` keyword (task 2.1 grades only the `naive`
cases of the convolution test). Grading copies the student's `minasgd/` and `kernels/` next to
the REFERENCE tests (from the source checkout this command runs from, so an edited test does
not count), runs pytest once per task with the CUDA simulator on (`--gpu`: a real GPU), and
prints a table. The exit status is 0 only when every task passes.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION task (?P<task>\d+\.\d+)(?::[ \t]*(?P<hint>.*?))?[ \t]*$")
END = re.compile(r"^(?P<indent>[ \t]*)# END SOLUTION[ \t]*$")
TODO = re.compile(r"^(?P<indent>[ \t]*)# TODO\(task (?P<task>\d+\.\d+)\)")

COPY = ("minasgd", "kernels", "tests", "pyproject.toml", "README.md")  # what a student tree holds
SCANNED = ("minasgd", "kernels")  # where solution regions may live
# Caches, and this tool's own test (instructor tooling: it needs the solution markers).
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", "*.nbi", "*.nbc",
                                "test_assignment.py")
MANIFEST = ".assignment.json"


@dataclass(frozen=True)
class Task:
    id: str
    family: str
    title: str
    covers: str  # what the student practises
    keyword: str | None = None  # narrows the marked tests to those whose name contains it
    needs: str | None = None  # a task whose code the grading tests also call

    @property
    def marker(self):
        return "task_" + self.id.replace(".", "_")


TASKS = (
    Task("1.1", "elementwise", "ReLU forward and backward kernels",
         "a first kernel: cuda.grid, grid-stride loops, float32 constants"),
    Task("1.2", "elementwise", "Dropout with a hash mask",
         "counter-based randomness: recompute the mask from (seed, index), bit-identical to NumPy"),
    Task("2.1", "conv", "Naive convolution forward",
         "one thread per output: decode a flat index into (n, k, p, q), padding and stride", keyword="naive"),
    Task("3.1", "pooling", "Max-pool forward with argmax",
         "window scans, first-maximum tie-breaking, an int32 argmax for backward"),
    Task("3.2", "pooling", "Max-pool backward by atomic scatter",
         "overlapping windows: a race between threads, fixed with cuda.atomic.add", needs="3.1"),
    Task("4.1", "softmax", "Softmax cross-entropy loss and gradient",
         "one thread per row, the max-subtraction that keeps exp finite, softmax - onehot"),
    Task("5.1", "gemm", "Shared-memory tiled GEMM",
         "tiling: stage A and B slabs in shared memory, two syncthreads per slab, transposed operands",
         keyword="tiled"),
    Task("6.1", "parameter server", "Apply a push: the update, version and staleness accounting",
         "the server side of async SGD: staleness = version now - version fetched, an lr divided by it"),
)
BY_ID = {t.id: t for t in TASKS}


class AssignmentError(ValueError):
    """A problem an instructor can fix (a bad task list, a busy OUTDIR, a broken marker)."""


# ------------------------------------------------------------------ finding and cutting regions

@dataclass
class Region:
    task: str
    hint: str
    indent: str
    begin: int  # line index of the BEGIN marker
    end: int  # line index of the END marker


def find_regions(text, where="<text>"):
    """The solution regions of a source text, in order; AssignmentError on a malformed marker."""
    regions, open_ = [], None
    for i, line in enumerate(text.split("\n")):
        b, e = BEGIN.match(line), END.match(line)
        if b:
            if open_ is not None:
                raise AssignmentError(f"{where}:{i + 1}: BEGIN SOLUTION inside the region opened at line {open_.begin + 1}")
            open_ = Region(b["task"], b["hint"] or "", b["indent"], i, -1)
        elif e:
            if open_ is None:
                raise AssignmentError(f"{where}:{i + 1}: END SOLUTION without a BEGIN")
            if e["indent"] != open_.indent:
                raise AssignmentError(f"{where}:{i + 1}: END SOLUTION is not indented like its BEGIN (line {open_.begin + 1})")
            open_.end = i
            regions.append(open_)
            open_ = None
        elif "SOLUTION" in line and re.search(r"#\s*(BEGIN|END)\s+SOLUTION", line):
            raise AssignmentError(f"{where}:{i + 1}: malformed marker (expected '# BEGIN SOLUTION task N.M: hint' or '# END SOLUTION')")
    if open_ is not None:
        raise AssignmentError(f"{where}:{open_.begin + 1}: BEGIN SOLUTION is never closed")
    return regions


def stub_lines(task, hint, indent):
    title = BY_ID[task].title if task in BY_ID else f"task {task}"
    return [f"{indent}# TODO(task {task}): {hint}".rstrip(), f'{indent}raise NotImplementedError("task {task}: {title}")']


def cut(text, stubbed, where="<text>"):
    """The student version of a source text: regions of `stubbed` tasks become stubs; all markers go."""
    lines = text.split("\n")
    out, pos = [], 0
    for r in find_regions(text, where):
        out.extend(lines[pos:r.begin])
        if r.task in stubbed:
            out.extend(stub_lines(r.task, r.hint, r.indent))
        else:
            out.extend(lines[r.begin + 1:r.end])
        pos = r.end + 1
    out.extend(lines[pos:])
    return "\n".join(out)


def restore_text(student, reference, tasks, where="<text>"):
    """Put the reference solutions of `tasks` back into a student file, stub by stub.

    The k-th stub of a task in the student file gets the k-th region of that task in the
    reference. Returns (new text, {task: stubs restored}, {task: stubs missing}).
    """
    solutions = {}
    ref_lines = reference.split("\n")
    for r in find_regions(reference, where):
        solutions.setdefault(r.task, []).append(ref_lines[r.begin + 1:r.end])
    lines = student.split("\n")
    out, used, i = [], {}, 0
    while i < len(lines):
        m = TODO.match(lines[i])
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if m and m["task"] in tasks and "raise NotImplementedError" in nxt:
            k = used.get(m["task"], 0)
            if k < len(solutions.get(m["task"], [])):
                out.extend(solutions[m["task"]][k])
                used[m["task"]] = k + 1
                i += 2
                continue
        out.append(lines[i])
        i += 1
    missing = {t: len(solutions.get(t, [])) - used.get(t, 0) for t in tasks if len(solutions.get(t, [])) > used.get(t, 0)}
    return "\n".join(out), used, missing


# ------------------------------------------------------------------ the source checkout

def source_root():
    """The source checkout this minasgd runs from (it holds kernels/ and tests/ next to minasgd/)."""
    root = Path(__file__).resolve().parent.parent
    if not ((root / "kernels").is_dir() and (root / "tests").is_dir() and (root / "pyproject.toml").is_file()):
        raise AssignmentError(f"minasgd assignment needs a source checkout (git clone, then pip install -e .); "
                              f"{root} has no kernels/ and tests/")
    return root


def python_files(root, tops=SCANNED):
    for top in tops:
        base = root / top
        if base.is_file():
            yield base
        elif base.is_dir():
            for path in sorted(base.rglob("*.py")):
                # this module's own docstring shows markers: it is not a solution file
                if "__pycache__" not in path.parts and path.name != "assignment.py":
                    yield path


def catalogue(root):
    """{task id: [(relative path, number of regions)]} for every region in the checkout."""
    found = {}
    for path in python_files(root):
        text = path.read_text()
        if "SOLUTION" not in text:
            continue
        rel = path.relative_to(root).as_posix()
        counts = {}
        for r in find_regions(text, rel):
            counts[r.task] = counts.get(r.task, 0) + 1
        for task, n in counts.items():
            found.setdefault(task, []).append((rel, n))
    return found


def parse_tasks(spec, available=None):
    """'1.1,2.1' / 'all' / '3' (every 3.x) -> sorted task ids; AssignmentError on an unknown one."""
    ids = [t.id for t in TASKS]
    if spec is None or spec.strip() in ("", "all"):
        chosen = list(ids)
    else:
        chosen = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            matches = [i for i in ids if i == part or (("." not in part) and i.split(".")[0] == part)]
            if not matches:
                raise AssignmentError(f"unknown task {part!r}; `minasgd assignment list` shows them ({', '.join(ids)})")
            chosen.extend(m for m in matches if m not in chosen)
    if available is not None:
        chosen = [t for t in chosen if t in available]
    return sorted(chosen, key=lambda t: tuple(int(x) for x in t.split(".")))


# ------------------------------------------------------------------ make

# Written as OUTDIR/conftest.py: pytest loads it before tests/conftest.py and before any test
# module imports minasgd.
SHIM = '''"""Written by `minasgd assignment make`: run the tests against THIS tree's code.

`python -m pytest` puts this folder first on sys.path, so `import minasgd` finds ./minasgd. The
kernels live in ./kernels and are imported as `minasgd.kernels`; an editable install of another
copy would map that name to ITS kernels folder, so bind it to ./kernels here, before any test
imports it.
"""

import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(_ROOT))
for _name in [n for n in sys.modules if n == "minasgd" or n.startswith("minasgd.")]:
    del sys.modules[_name]
import minasgd  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "minasgd.kernels", _ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(_ROOT / "kernels")])
_kernels = importlib.util.module_from_spec(_spec)
sys.modules["minasgd.kernels"] = _kernels
_spec.loader.exec_module(_kernels)
minasgd.kernels = _kernels
assert Path(minasgd.__file__).resolve().parent == _ROOT / "minasgd", minasgd.__file__
'''


def git_commit(root):
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def make(outdir, tasks, root=None, force=False):
    """Write a student tree for `tasks` to outdir; returns {task: [files with stubs]}."""
    root = root or source_root()
    outdir = Path(outdir)
    found = catalogue(root)
    lost = [t for t in tasks if t not in found]
    if lost:
        raise AssignmentError(f"no solution regions for task(s) {', '.join(lost)} in {root}")
    if outdir.exists() and any(outdir.iterdir()):
        if not force:
            raise AssignmentError(f"{outdir} exists and is not empty (use --force to replace it)")
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, outdir / name, ignore=IGNORE)
        elif src.is_file():
            shutil.copy2(src, outdir / name)
    stubs = {t: [] for t in tasks}
    for path in python_files(outdir):
        text = path.read_text()
        if "SOLUTION" not in text:
            continue
        rel = path.relative_to(outdir).as_posix()
        new = cut(text, set(tasks), rel)
        compile(new, rel, "exec")  # a stub must leave valid Python behind
        path.write_text(new)
        for r in find_regions(text, rel):
            if r.task in stubs and rel not in stubs[r.task]:
                stubs[r.task].append(rel)
    (outdir / "conftest.py").write_text(SHIM)
    manifest = {"tasks": list(tasks), "files": stubs, "source": str(root), "commit": git_commit(root),
                "made": time.strftime("%Y-%m-%d %H:%M:%S")}
    (outdir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (outdir / "ASSIGNMENT.md").write_text(assignment_md(tasks, stubs))
    return stubs


def assignment_md(tasks, stubs):
    lines = ["# Assignment", "",
             "Each task below replaced some code with a stub:", "",
             "    # TODO(task N.M): what to write", '    raise NotImplementedError("task N.M: ...")', "",
             "Replace the two lines with your code. The hint says what the code must do; the docstring of",
             "the function around it, and the module docstring, say more. Run a task's tests with",
             "`python -m pytest -m task_N_M` from this folder (the CUDA kernels run on Numba's CUDA",
             "simulator, no GPU needed). Other tests that call your functions fail until you are done.", "",
             "| task | what | files | tests |", "| --- | --- | --- | --- |"]
    for t in tasks:
        task = BY_ID[t]
        tests = f"`pytest -m {task.marker}" + (f" -k {task.keyword}`" if task.keyword else "`")
        needs = f" (its tests also run task {task.needs}: do that first)" if task.needs in tasks else ""
        lines.append(f"| {t} | {task.title}: {task.covers}{needs} | {', '.join(f'`{f}`' for f in stubs[t])} | {tests} |")
    lines += ["", "Your instructor grades with `minasgd assignment grade DIR`, which runs the same tests.", ""]
    return "\n".join(lines)


def read_manifest(tree):
    path = Path(tree) / MANIFEST
    if not path.is_file():
        raise AssignmentError(f"{tree} is not a student tree made by `minasgd assignment make` (no {MANIFEST})")
    return json.loads(path.read_text())


# ------------------------------------------------------------------ restore

def restore(tree, tasks, root=None):
    """Put the reference solutions of `tasks` back into a student tree. Returns {task: (restored, missing)}."""
    root = root or source_root()
    tree = Path(tree)
    manifest = read_manifest(tree)
    result = {t: [0, 0] for t in tasks}
    for ref_path in python_files(root):
        reference = ref_path.read_text()
        if "SOLUTION" not in reference:
            continue
        rel = ref_path.relative_to(root).as_posix()
        target = tree / rel
        if not target.is_file():
            continue
        new, used, missing = restore_text(target.read_text(), reference, set(tasks), rel)
        if used:
            compile(new, rel, "exec")
            target.write_text(new)
        for t in tasks:
            result[t][0] += used.get(t, 0)
            result[t][1] += missing.get(t, 0)
    manifest["tasks"] = [t for t in manifest["tasks"] if t not in tasks or result[t][1] > 0]
    (tree / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {t: tuple(v) for t, v in result.items()}


# ------------------------------------------------------------------ grade

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


# Appended to the grading copy's conftest.py: pytest keeps exactly the tests of the graded tasks
# (marker, and keyword if the task has one) and writes each test's tasks and outcome to a JSON file.
GRADER = '''

# ---- added for grading by `minasgd assignment grade`
import json as _json
import os as _os

_TASKS = _json.loads(_os.environ["MINASGD_GRADE_TASKS"])  # {marker: keyword or None}
_OWNERS, _RESULTS = {}, {}


def pytest_collection_modifyitems(config, items):
    keep = []
    for item in items:
        mine = [m for m, kw in _TASKS.items() if item.get_closest_marker(m) and (not kw or kw in item.name)]
        if mine:
            _OWNERS[item.nodeid] = mine
            keep.append(item)
    config.hook.pytest_deselected(items=[i for i in items if i.nodeid not in _OWNERS])
    items[:] = keep


def pytest_runtest_logreport(report):
    if report.nodeid not in _OWNERS:
        return
    r = _RESULTS.setdefault(report.nodeid, {"tasks": _OWNERS[report.nodeid], "outcome": "passed", "message": ""})
    if report.failed and r["outcome"] not in ("failed", "error"):
        r["outcome"] = "failed" if report.when == "call" else "error"
        crash = getattr(report.longrepr, "reprcrash", None)
        r["message"] = crash.message if crash is not None else str(report.longrepr)[-300:]
    elif report.skipped and r["outcome"] == "passed":
        r["outcome"] = "skipped"


def pytest_sessionfinish(session, exitstatus):
    with open(_os.environ["MINASGD_GRADE_OUT"], "w") as f:
        _json.dump({"results": _RESULTS}, f)
'''


def grading_dir(tree, root, workdir):
    """A throwaway copy: the student's code (minasgd/, kernels/) with the reference tests."""
    for name in ("minasgd", "kernels"):
        shutil.copytree(Path(tree) / name, workdir / name, ignore=IGNORE)
    shutil.copytree(root / "tests", workdir / "tests", ignore=IGNORE)
    shutil.copy2(root / "pyproject.toml", workdir / "pyproject.toml")
    (workdir / "conftest.py").write_text(SHIM + GRADER)


def short(message):
    """The first line of a failure, without the simulator's 'tid=[..] ctaid=[..]: ' prefix."""
    line = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    return re.sub(r"tid=\[[^\]]*\] ctaid=\[[^\]]*\]: ", "", line)


def run_tests(workdir, tasks, gpu=False, timeout=1800):
    """Run the grading tests of `tasks` in workdir, in ONE pytest process; returns [Grade]."""
    out = workdir / "grades.json"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", MINASGD_GRADE_OUT=str(out),
               MINASGD_GRADE_TASKS=json.dumps({BY_ID[t].marker: BY_ID[t].keyword for t in tasks}))
    env.pop("PYTHONPATH", None)
    if gpu:
        env["MINASGD_TEST_GPU"] = "1"
        env.pop("NUMBA_ENABLE_CUDASIM", None)
    else:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
        env.pop("MINASGD_TEST_GPU", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
    grades = {t: Grade(t) for t in tasks}
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        for g in grades.values():
            g.errors, g.first_failure = 1, f"timed out after {timeout} s"
        return list(grades.values())
    if not out.is_file():  # pytest stopped before running anything (an import error, say)
        lines = [l for l in (proc.stdout + proc.stderr).strip().splitlines() if "Error" in l] or ["pytest did not run"]
        for g in grades.values():
            g.errors, g.first_failure = 1, lines[-1].strip()
        return list(grades.values())
    by_marker = {BY_ID[t].marker: grades[t] for t in tasks}
    for nodeid, r in json.loads(out.read_text())["results"].items():
        for marker in r["tasks"]:
            g = by_marker[marker]
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
    for g in grades.values():
        if g.passed + g.failed + g.errors + g.skipped == 0:
            g.errors, g.first_failure = 1, "no grading tests found for this task"
    return list(grades.values())


def grade(tree, tasks, root=None, gpu=False):
    """Grade `tasks` of a student tree against the reference tests; returns [Grade]."""
    root = root or source_root()
    tree = Path(tree)
    for name in ("minasgd", "kernels"):
        if not (tree / name).is_dir():
            raise AssignmentError(f"{tree} has no {name}/ folder: not a minasgd student tree")
    with tempfile.TemporaryDirectory(prefix="minasgd-grade-") as tmp:
        workdir = Path(tmp)
        grading_dir(tree, root, workdir)
        return run_tests(workdir, tasks, gpu=gpu)


# ------------------------------------------------------------------ the command line

def add_arguments(p):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="the tasks, their files and grading tests")
    m = sub.add_parser("make", help="write a student tree with the chosen tasks stubbed out")
    m.add_argument("outdir", help="the folder to create")
    m.add_argument("--tasks", default="all", help="comma-separated task ids (1.1,2.1), a family number (3) or all (default)")
    m.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    g = sub.add_parser("grade", help="run the grading tests of each task of a student tree")
    g.add_argument("tree", help="the student tree")
    g.add_argument("--tasks", help="default: the tasks the tree was made with")
    g.add_argument("--gpu", action="store_true", help="run the kernels on a real GPU instead of the simulator")
    r = sub.add_parser("restore", help="put the reference solutions back into a student tree")
    r.add_argument("tree", help="the student tree")
    r.add_argument("--tasks", help="default: every stubbed task")


def run(args, console):
    try:
        return _run(args, console)
    except AssignmentError as e:
        console.print(f"[red]minasgd assignment {args.action}: {e}[/]", highlight=False, soft_wrap=True)
        return 2


def _run(args, console):
    from rich.markup import escape
    from rich.table import Table

    if args.action == "list":
        root = source_root()
        found = catalogue(root)
        table = Table(title=f"assignment tasks in {root}")
        for col in ("task", "family", "title", "practises", "files", "grading tests"):
            table.add_column(col)
        for t in TASKS:
            files = ", ".join(f"{f} ({n})" if n > 1 else f for f, n in found.get(t.id, [])) or "[red]no regions[/]"
            tests = f"-m {t.marker}" + (f" -k {t.keyword}" if t.keyword else "") + (f" (needs {t.needs})" if t.needs else "")
            table.add_row(t.id, t.family, t.title, t.covers, files, tests)
        console.print(table)
        return 0

    if args.action == "make":
        tasks = parse_tasks(args.tasks)
        stubs = make(args.outdir, tasks, force=args.force)
        for t in tasks:
            console.print(f"task {t} {BY_ID[t].title}: stubbed in {', '.join(stubs[t])}", highlight=False)
        console.print(f"wrote {args.outdir} ({len(tasks)} task(s)); students start with {args.outdir}/ASSIGNMENT.md; "
                      f"grade with: minasgd assignment grade {args.outdir}", highlight=False)
        return 0

    manifest = read_manifest(args.tree) if (Path(args.tree) / MANIFEST).is_file() else None
    if args.action == "restore":
        if manifest is None:
            read_manifest(args.tree)  # raises the one-line error
        tasks = parse_tasks(args.tasks) if args.tasks else list(manifest["tasks"])
        for t, (done, missing) in restore(args.tree, tasks).items():
            note = f", [yellow]{missing} stub(s) not found (edited?)[/]" if missing else ""
            console.print(f"task {t}: restored {done} region(s){note}", highlight=False)
        return 0

    if args.action == "grade":
        if args.tasks:
            tasks = parse_tasks(args.tasks)
        elif manifest is not None:
            tasks = list(manifest["tasks"])
        else:
            raise AssignmentError(f"{args.tree} has no {MANIFEST}; say which tasks with --tasks")
        if not tasks:
            raise AssignmentError("no tasks to grade")
        started = time.perf_counter()
        with console.status(f"grading task(s) {', '.join(tasks)} ({'real GPU' if args.gpu else 'CUDA simulator'})"):
            grades = grade(args.tree, tasks, gpu=args.gpu)
        table = Table(title=f"{args.tree}: {'real GPU' if args.gpu else 'CUDA simulator'}, {time.perf_counter() - started:.0f} s")
        for col in ("task", "title", "tests passed", "result", "first failure"):
            table.add_column(col, justify="right" if col == "tests passed" else "left")
        for g in grades:
            total = g.passed + g.failed + g.errors
            result = "[green]PASS[/]" if g.ok else "[red]FAIL[/]"
            table.add_row(g.task, BY_ID[g.task].title, f"{g.passed}/{total}", result, escape(g.first_failure[:90]))
        console.print(table)
        passed = sum(g.ok for g in grades)
        console.print(f"{passed} of {len(grades)} task(s) pass", highlight=False)
        return 0 if passed == len(grades) else 1

    raise AssertionError(args.action)
