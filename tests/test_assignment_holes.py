"""The grader, attacked as a clever student would (issue 21): each test is one class of hole,
tried the way it fooled the grader before, and must now FAIL to fool it.

    in-process results     an atexit hook that rewrites the grades file (outside any region)
    no kernel at all       a launcher that uses NumPy when it sees the grading environment;
                           host Python inside a kernel region, in a branch only the simulator takes
    hard-coded outputs     a table of the outputs for the local seed
    patching the checkers  replacing racecheck.checking from a graded file at import
    importable solution    what the grading child can see of the instructor's checkout
    races through views    the lost update written through dx.T
    graded in place        a student tree used as the source checkout
    the wrong algorithm    the naive loop in the tiled GEMM, one atomic per thread in the block sum

and the other side: solutions in a student's own words pass grading and the tree's own suite.
Shipped to no student (tree.IGNORE): it holds answers. The grading runs take 10-30 s each.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minasgd import assignment
from minasgd.assignment import AssignmentError, grading
from test_assignment import TREE_PLAIN_FINISH, solve_with

ROOT = assignment.source_root()
QUIET_PYTEST = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")  # a child pytest: no xdist, hypothesis ... start-up


def append(path, text):
    path.write_text(path.read_text() + text)


def by_task(grades):
    return {g.task: g for g in grades}


# ------------------------------------------------------------------ the attacks' code

# Python that marks every result in the grades file "passed" (run at exit, after the plugin wrote it).
ALL_PASSED = (
    "import glob, json, os\n"
    "for path in glob.glob(os.path.join(os.getcwd(), 'grades*.json')) + [os.environ.get('MINASGD_GRADE_OUT', '')]:\n"
    "    if path and os.path.exists(path):\n"
    "        data = json.load(open(path))\n"
    "        for r in data['results'].values():\n"
    "            r['outcome'], r['message'] = 'passed', ''\n"
    "        json.dump(data, open(path, 'w'))\n")

REWRITE_GRADES_AT_EXIT = f"""

import atexit as _atexit  # added by the student: every grade file says "passed" at exit

_atexit.register(exec, {ALL_PASSED!r}, {{}})
"""

NUMPY_WHEN_GRADED = '''

import os as _os

if "MINASGD_GRADE_TASKS" in _os.environ or "MINASGD_TEST_SEED" in _os.environ:  # graded: no kernel at all
    def launch_relu_forward(x, y):
        y[:] = np.maximum(x.copy_to_host(), np.float32(0)).reshape(y.shape)

    def launch_relu_backward(dy, y, dx):
        dx[:] = np.where(y.copy_to_host() > 0, dy.copy_to_host(), np.float32(0)).reshape(dx.shape)
'''

UNCHECKED_RACES = '''

from . import racecheck as _rc  # added by the student: the race checker sees nothing
import contextlib as _contextlib


@_contextlib.contextmanager
def _blind():
    class _Clean:
        found, launched, launches = [], [], []

        def assert_clean(self):
            pass

        def count(self, *args, **kwargs):
            return 1

    yield _Clean()


_rc.checking = _blind
'''

# Host Python inside the kernel, in a branch only the simulator takes (THREADS is 32 there,
# 256 when compiling for a GPU): the same grades rewrite at exit, registered from the kernel.
HOST_CODE_IN_KERNEL = f"""    if THREADS == 32:
        if start == 0:
            __import__("atexit").register(exec, {ALL_PASSED!r}, {{}})
    for i in range(start, x.size, stride):
        y[i] = float32(0)
"""
ZEROS_BACKWARD = """    for i in range(start, dy.size, stride):
        dx[i] = float32(0)
"""

PLAIN_ADD_THROUGH_VIEW = '''    for idx in range(start, dy.size, step):
        q = idx % q_
        p = (idx // q_) % p_
        c = (idx // (q_ * p_)) % c_
        n = idx // (q_ * p_ * c_)
        at = argmax[n, c, p, q]
        dx.T[at % w_, at // w_, c, n] += dy[n, c, p, q]
'''

ONE_ATOMIC_PER_THREAD = '''    cuda.atomic.add(out, 0, partial[tid])
'''

NAIVE_IN_TILED = '''        acc = float32(0)
        if row < m and col < n:
            for kk in range(k_dim):
                av = a[kk, row] if trans_a else a[row, kk]
                bv = b[col, kk] if trans_b else b[kk, col]
                acc += av * bv
            if has_bias:
                acc += bias[col]
            c[row, col] = acc
'''

# Correct solutions in a student's own words (not the instructor's lines).
OWN_RELU = ('''    i = start
    while i < x.size:
        y[i] = max(x[i], float32(0))
        i += stride
''', '''    i = start
    while i < dy.size:
        dx[i] = float32(0) if y[i] <= float32(0) else dy[i]
        i += stride
''')

OWN_SCATTER = '''    per_image = c_ * p_ * q_
    for flat_i in range(start, dy.size, step):
        img = flat_i // per_image
        ch = (flat_i // (p_ * q_)) % c_
        oy = (flat_i // q_) % p_
        ox = flat_i % q_
        where = argmax[img, ch, oy, ox]
        cuda.atomic.add(dx, (img, ch, where // w_, where - (where // w_) * w_), dy[img, ch, oy, ox])
'''

OWN_TREE = '''    stride_ = 1
    while stride_ < BLOCK:
        stride_ *= 2
    stride_ //= 2
    while stride_ >= 1:
        if tid < stride_:
            partial[tid] = partial[tid] + partial[tid + stride_]
        cuda.syncthreads()
        stride_ = stride_ // 2
    if tid == 0:
        cuda.atomic.add(out, 0, partial[0])
'''

OWN_TILED = '''        total = float32(0)
        slabs = (k_dim + tile - 1) // tile
        for sl in range(slabs):
            base = sl * tile
            if trans_a:
                sa[tx, ty] = a[base + ty, row0 + tx] if (base + ty < k_dim and row0 + tx < m) else float32(0)
            else:
                sa[ty, tx] = a[row, base + tx] if (base + tx < k_dim and row < m) else float32(0)
            if trans_b:
                sb[tx, ty] = b[col0 + ty, base + tx] if (base + tx < k_dim and col0 + ty < n) else float32(0)
            else:
                sb[ty, tx] = b[base + ty, col] if (base + ty < k_dim and col < n) else float32(0)
            cuda.syncthreads()
            for e in range(tile):
                total += sa[ty, e] * sb[e, tx]
            cuda.syncthreads()
        if row < m and col < n:
            c[row, col] = total + (bias[col] if has_bias else float32(0))
'''


def relu_table(seed):
    """1.1 as a table: the outputs the ReLU test expects for inputs drawn from `seed`, by index."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)  # as tests/test_cuda_kernels.py draws them
    x[0, 0, :3] = 0.0
    y = np.maximum(x, 0).ravel()
    dy = rng.standard_normal(x.shape).astype(np.float32).ravel()
    dx = np.where(y > 0, dy, 0).astype(np.float32)

    def chain(out, values):
        lines = [f"    for i in range(start, {out}.size, stride):", f"        {out}[i] = float32(0)"]
        lines += [f"        if i == {i}:\n            {out}[i] = float32({float(v)!r})" for i, v in enumerate(values) if v]
        return "\n".join(lines) + "\n"

    return chain("y", y), chain("dx", dx)


# ------------------------------------------------------------------ fast: merging, refusing, scanning

REFERENCE = '''import os


def launch(x):
    return kernel(x)


def kernel(x, y):
    i = 0
    # BEGIN SOLUTION task 1.1: y is x plus one
    y[i] = x[i] + 1
    # END SOLUTION
    return y
'''


def test_only_the_regions_of_a_student_file_are_graded():
    raise_line = '    raise NotImplementedError("task 1.1: ReLU forward and backward kernels")'
    solved = assignment.cut(REFERENCE, {"1.1"}).replace(raise_line, "    y[i] = x[i] + 2  # mine")
    student = solved.replace("return kernel(x)", "return 'numpy on the host'")  # an edited launcher
    student += "\nimport atexit\natexit.register(print)\n"  # module-level code
    merged, spans = assignment.merge_regions(REFERENCE, student, "1.1", "k.py")
    assert merged == solved
    assert "atexit" not in merged and "numpy on the host" not in merged
    assert spans == [(10, 11)]  # the comment line kept by the student and the code


@pytest.mark.parametrize("body, message", [
    ("    y[i] = 2\nimport atexit\natexit.register(print)\n", "indented less"),  # module level: runs at import
    ("    y[i] = 2\ndef kernel2():\n    pass\n", "indented less"),
    ('    y[i] = 2\n    s = """\n', "does not end"),  # swallows the code after the region
    ("    y[i] = (2,\n", "does not end"),
])
def test_code_that_would_leave_the_region_is_refused(body, message):
    student = assignment.cut(REFERENCE, {"1.1"})
    student = re.sub(r"    # TODO\(task 1\.1\).*\n.*NotImplementedError.*\n", body, student)
    with pytest.raises(AssignmentError, match=message):
        assignment.merge_regions(REFERENCE, student, "1.1", "k.py")


def test_a_stub_whose_surroundings_were_edited_is_reported():
    student = assignment.cut(REFERENCE, {"1.1"}).replace("    i = 0\n", "    i = 1\n")
    with pytest.raises(AssignmentError, match="cannot be found"):
        assignment.merge_regions(REFERENCE, student, "1.1", "k.py")


def test_a_student_tree_is_refused_as_the_source_checkout(tmp_path):
    tree = tmp_path / "student"
    assignment.make(tree, ["1.1"])
    for call in (lambda: assignment.check_source_root(tree), lambda: assignment.grade(tree, ["1.1"], root=tree),
                 lambda: assignment.make(tmp_path / "again", ["1.1"], root=tree)):
        with pytest.raises(AssignmentError, match="student tree, not the instructor's checkout"):
            call()
    with pytest.raises(AssignmentError, match="is the source checkout"):
        assignment.grade(ROOT, ["1.1"])


def test_the_grading_child_cannot_reach_the_instructors_checkout(tmp_path):
    """What a graded file's code could look at (sys.path, installed metadata, the interpreter, the
    environment) names only the throwaway folder: no route back to the solutions."""
    work = tmp_path / "work"
    work.mkdir()
    assignment.grading_dir(ROOT, ROOT, work, "6.1")  # the reference itself is enough to probe
    site = grading.clean_site_dirs(ROOT, tmp_path / "site")
    env = grading.child_env(ROOT, {"MINASGD_TEST_SEED": "5"})
    proc = grading.run_child("probe", work, site, env, 120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    root = str(ROOT)
    assert Path(seen["minasgd"]).resolve().parent == (work / "minasgd").resolve()
    assert not [p for p in seen["sys_path"] if p.startswith(root)], seen["sys_path"]
    assert not seen["distributions"], seen["distributions"]  # no metadata of an installed minasgd
    assert root not in seen["executable"] and root not in seen["prefix"]
    assert not [k for k, v in seen["environ"].items() if root in v], seen["environ"]
    assert not [f for f in seen["meta_path"] if "editable" in f.lower()], seen["meta_path"]


def _norm(line):
    line = line.strip()
    return " ".join(line.split()) if line.startswith("#") else " ".join(line.split("#")[0].split())


def solution_pairs(root):
    """Every two consecutive non-blank lines of every solution region: {(line, line): where}."""
    pairs = {}
    for task, files in assignment.catalogue(root).items():
        for rel, _ in files:
            text = (root / rel).read_text()
            lines = text.split("\n")
            for r in assignment.find_regions(text, rel):
                body = [l for l in map(_norm, lines[r.begin + 1:r.end]) if l]
                for pair in zip(body, body[1:]):
                    pairs.setdefault(pair, f"task {task}, {rel}:{r.begin + 1}")
    return pairs


@pytest.fixture(scope="module")
def cut_tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("holes") / "all"
    assignment.make(out, assignment.parse_tasks("all"))
    return out


def test_no_two_consecutive_lines_of_any_solution_anywhere_in_a_student_tree(cut_tree):
    pairs = solution_pairs(ROOT)
    assert len(pairs) > 100
    hits = []
    for path in sorted(p for p in cut_tree.rglob("*") if p.is_file()):
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        body = [l for l in map(_norm, text.split("\n")) if l]
        hits += [f"{path.relative_to(cut_tree)}: {a!r} / {b!r} ({pairs[(a, b)]})"
                 for a, b in zip(body, body[1:]) if (a, b) in pairs]
    assert not hits, "\n".join(hits)


def test_hints_say_what_not_how():
    """A hint holds no line of its solution and names none of the CUDA calls the solution makes."""
    for task, files in assignment.catalogue(ROOT).items():
        for rel, _ in files:
            text = (ROOT / rel).read_text()
            lines = text.split("\n")
            for r in assignment.find_regions(text, rel):
                hint = " ".join(r.hint.split())
                for line in map(_norm, lines[r.begin + 1:r.end]):
                    if len(line) >= 10 and not line.startswith("#"):
                        assert line not in hint, f"{rel}:{r.begin + 1}: the hint of task {task} holds {line!r}"
                for call in set(re.findall(r"cuda\.\w+(?:\.\w+)?", "\n".join(lines[r.begin + 1:r.end]))):
                    assert call not in hint, f"{rel}:{r.begin + 1}: the hint of task {task} names {call}"
                assert "self._" not in hint and len(hint) < 300, (rel, r.begin + 1, hint)


def test_the_tests_inputs_follow_the_grading_seed(tmp_path):
    """The `rng` fixture draws from MINASGD_TEST_SEED, and every kernel task has a grading test that uses it."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_probe.py").write_text("def test_draw(rng):\n    print('DRAW', rng.integers(1 << 30))\n")
    draws = []
    for seed in ("1234", "99"):
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "test_probe.py"],
                             capture_output=True, text=True, env=dict(QUIET_PYTEST, MINASGD_TEST_SEED=seed),
                             cwd=tmp_path, timeout=120)
        draws.append(re.search(r"DRAW (\d+)", run.stdout))
    assert all(draws) and draws[0].group(1) != draws[1].group(1), run.stdout[-1000:]
    text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for t in assignment.TASKS:
        if not t.host:
            uses = re.findall(rf"@pytest\.mark\.{t.marker}\n(?:@.*\n)*def \w+\(([^)]*)\)", text)
            assert any("rng" in args for args in uses), f"no grading test of task {t.id} draws from rng"


# ------------------------------------------------------------------ slow: the attacks, graded end to end

@pytest.mark.slow
def test_code_outside_the_regions_changes_nothing(tmp_path):
    """Three attacks that fooled the grader, none of which touches a stub's code:
    1.1 left a stub, plus an atexit hook that rewrites the grades file and launchers that use
    NumPy when they see the grading environment (graded 9/9 before); 7.1 a plain += finish
    plus a patched race checker at import. All must FAIL."""
    tree = tmp_path / "student"
    assignment.make(tree, ["1.1", "7.1"])
    append(tree / "kernels" / "elementwise.py", REWRITE_GRADES_AT_EXIT + NUMPY_WHEN_GRADED)
    solve_with(tree / "kernels" / "reduce.py", "7.1", TREE_PLAIN_FINISH)
    append(tree / "kernels" / "reduce.py", UNCHECKED_RACES)
    grades = by_task(assignment.grade(tree, ["1.1", "7.1"]))
    assert not grades["1.1"].ok and "NotImplementedError: task 1.1" in grades["1.1"].first_failure, grades["1.1"]
    assert not grades["7.1"].ok and "race" in grades["7.1"].first_failure, grades["7.1"]


@pytest.mark.slow
def test_host_code_in_a_kernel_and_the_wrong_algorithms_fail(tmp_path):
    """1.1: host Python inside the kernel (an atexit hook that marks every result passed), in a
    branch only the simulator takes (THREADS is 32 there): it compiles for a GPU only if the
    compiler prunes that branch, so it must be refused.
    3.2: the lost update written through dx.T. 5.1: the naive loop in the tiled kernel. 7.1: one
    atomic per thread. Each gives the right numbers; each must FAIL."""
    tree = tmp_path / "student"
    assignment.make(tree, ["1.1", "3.2", "5.1", "7.1"])
    elementwise = tree / "kernels" / "elementwise.py"
    solve_with(elementwise, "1.1", HOST_CODE_IN_KERNEL, which=0)
    solve_with(elementwise, "1.1", ZEROS_BACKWARD, which=0)
    solve_with(tree / "kernels" / "pool.py", "3.2", PLAIN_ADD_THROUGH_VIEW)
    solve_with(tree / "kernels" / "gemm.py", "5.1", NAIVE_IN_TILED)
    solve_with(tree / "kernels" / "reduce.py", "7.1", ONE_ATOMIC_PER_THREAD)
    grades = by_task(assignment.grade(tree, ["1.1", "3.2", "5.1", "7.1"]))
    assert not grades["1.1"].ok and grades["1.1"].first_failure.startswith("not GPU code"), grades["1.1"]
    assert not grades["3.2"].ok and "race" in grades["3.2"].first_failure, grades["3.2"]
    assert not grades["5.1"].ok and "loads of each element of A" in grades["5.1"].first_failure, grades["5.1"]
    assert not grades["7.1"].ok and "atomic adds for" in grades["7.1"].first_failure, grades["7.1"]


@pytest.mark.slow
def test_a_table_of_outputs_passes_only_the_seed_it_was_made_for(tmp_path):
    tree = tmp_path / "student"
    assignment.make(tree, ["1.1"])
    forward, backward = relu_table(1234)
    solve_with(tree / "kernels" / "elementwise.py", "1.1", forward, which=0)
    solve_with(tree / "kernels" / "elementwise.py", "1.1", backward, which=0)
    assert assignment.grade(tree, ["1.1"], seed=1234)[0].ok  # the table is right for the local seed
    g = assignment.grade(tree, ["1.1"])[0]  # a seed drawn at grading time
    assert not g.ok and "got" in g.first_failure, g


@pytest.mark.slow
def test_solutions_in_a_students_own_words_pass_grading_and_the_trees_own_suite(tmp_path):
    """Correct answers to 1.1, 3.2, 5.1 and 7.1 not in the instructor's lines: each grades PASS, and
    the tree's own race checks and the tasks' kernel tests pass (no false alarm on other words)."""
    tree = tmp_path / "student"
    tasks = ["1.1", "3.2", "5.1", "7.1"]
    assignment.make(tree, tasks)
    solve_with(tree / "kernels" / "elementwise.py", "1.1", OWN_RELU[0], which=0)
    solve_with(tree / "kernels" / "elementwise.py", "1.1", OWN_RELU[1], which=0)
    solve_with(tree / "kernels" / "pool.py", "3.2", OWN_SCATTER)
    solve_with(tree / "kernels" / "gemm.py", "5.1", OWN_TILED)
    solve_with(tree / "kernels" / "reduce.py", "7.1", OWN_TREE)
    grades = assignment.grade(tree, tasks)
    assert all(g.ok for g in grades), grades
    # the tree's own suite, in one pytest: all of test_racecheck.py (every kernel, the student's
    # among them, runs race-free) and the tasks' tests of test_cuda_kernels.py (-k matches markers)
    marked = " or ".join(f"task_{t.replace('.', '_')}" for t in tasks)
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/test_racecheck.py",
                          "tests/test_cuda_kernels.py", "-k", f"test_racecheck or {marked}"],
                         cwd=tree, capture_output=True, text=True, timeout=900, env=QUIET_PYTEST)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    race_tests = set(re.findall(r"^def (test_\w+)", (tree / "tests" / "test_racecheck.py").read_text(), re.M))
    assert set(re.findall(r"test_racecheck\.py::(\w+)\S* PASSED", run.stdout)) == race_tests, run.stdout[-3000:]
    assert "test_cuda_kernels.py::test_gemm_matches_numpy" in run.stdout, run.stdout[-3000:]


@pytest.mark.slow
def test_a_graded_test_that_launches_no_graded_kernel_fails(tmp_path):
    """The second signal behind region-only grading: were a launcher ever graded (a region in
    host code), a launcher that computes on the host without launching the kernel would still
    fail, because each graded test must launch a kernel that holds the task's code (launching
    another kernel of the file, here `fill`, does not count)."""
    tree = tmp_path / "student"
    assignment.make(tree, ["1.1"])
    append(tree / "kernels" / "elementwise.py", NUMPY_WHEN_GRADED.replace(
        "        y[:] = np.maximum(", "        launch_fill(y, 0.0)  # a kernel of the file, not the graded one\n        y[:] = np.maximum("))
    work = tmp_path / "work"
    work.mkdir()
    spans = assignment.grading_dir(tree, ROOT, work, "1.1")
    (work / "kernels" / "elementwise.py").write_text((tree / "kernels" / "elementwise.py").read_text())  # as if graded
    env = grading.child_env(ROOT, {"MINASGD_TEST_SEED": "7", "NUMBA_ENABLE_CUDASIM": "1",
                                   "MINASGD_GRADE_FILES": json.dumps(sorted(spans)),
                                   "MINASGD_GRADE_KERNELS": json.dumps(["relu_backward_kernel", "relu_forward_kernel"])})
    g = grading.run_tests(work, "1.1", grading.clean_site_dirs(ROOT, tmp_path / "site"), env)
    assert not g.ok and "without launching any kernel" in g.first_failure, g
