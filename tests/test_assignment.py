"""The assignment tool: markers, cutting and restoring text, a student tree, and grading that
cannot be fooled (the student's reference is not used, races fail, each task grades alone, a
solved tree's own suite is green).

The grading tests each run ONE pytest subprocess restricted to the graded tasks' test files,
and copy trees without caches: about 5-15 s each on the simulator.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import config, cuda

from minasgd import assignment, cli
from minasgd.assignment import AssignmentError

ROOT = assignment.source_root()

SAMPLE = '''def f(x, y):
    """doc"""
    i = 0
    # BEGIN SOLUTION task 1.1: add one
    y[i] = x[i] + 1
    # END SOLUTION
    return y


def g():
    # BEGIN SOLUTION task 2.1: return two
    return 2
    # END SOLUTION
'''


def test_cut_stubs_selected_tasks_keeps_the_others_and_drops_every_marker():
    text = assignment.cut(SAMPLE, {"1.1"})
    assert "SOLUTION" not in text
    assert '    # TODO(task 1.1): add one\n    raise NotImplementedError("task 1.1: ' in text
    assert "y[i] = x[i] + 1" not in text and "    return 2\n" in text
    compile(text, "sample", "exec")
    assert assignment.cut(SAMPLE, set()) == "\n".join(l for l in SAMPLE.split("\n") if "SOLUTION" not in l)


def test_restore_puts_each_solution_back_and_leaves_edited_stubs_alone():
    student = assignment.cut(SAMPLE, {"1.1", "2.1"})
    restored, used, missing = assignment.restore_text(student, SAMPLE, {"1.1", "2.1"})
    assert restored == assignment.cut(SAMPLE, set()) and used == {"1.1": 1, "2.1": 1} and not missing
    edited = student.replace('raise NotImplementedError("task 2.1', 'pass  # mine ("task 2.1')
    restored, used, missing = assignment.restore_text(edited, SAMPLE, {"1.1", "2.1"})
    assert used == {"1.1": 1} and missing == {"2.1": 1} and "pass  # mine" in restored


@pytest.mark.parametrize("text, message", [
    ("# BEGIN SOLUTION task 1.1: x\n# BEGIN SOLUTION task 1.2: y\n# END SOLUTION\n", "inside the region"),
    ("x = 1\n# END SOLUTION\n", "without a BEGIN"),
    ("# BEGIN SOLUTION task 1.1: x\nx = 1\n", "never closed"),
    ("    # BEGIN SOLUTION task 1.1: x\n    x = 1\n# END SOLUTION\n", "not indented like"),
    ("# BEGIN SOLUTION 1.1\n", "malformed"),
])
def test_malformed_markers_are_reported_with_their_line(text, message):
    with pytest.raises(AssignmentError, match=message):
        assignment.find_regions(text, "f.py")


def test_every_task_has_solution_regions_and_grading_tests():
    found = assignment.catalogue(ROOT)
    assert set(found) == {t.id for t in assignment.TASKS}, "a task without regions, or a region of an unknown task"
    families = {t.family for t in assignment.TASKS}
    assert {"elementwise", "conv", "pooling", "softmax", "gemm", "parameter server", "reduction"} <= families
    test_text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for t in assignment.TASKS:
        assert f"@pytest.mark.{t.marker}\n" in test_text, f"no grading test carries {t.marker}"
        assert assignment.graded_files(ROOT, [t.id]), f"task {t.id} has no graded file (only tutorial exercises?)"


def test_no_grading_test_carries_two_task_markers():
    """Each task is graded alone: a test with two markers would fail one task for the other's stub."""
    for path in (ROOT / "tests").glob("test_*.py"):
        markers = re.findall(r"((?:@pytest\.mark\.task_\d+_\d+\n)+)def (\w+)", path.read_text())
        for block, name in markers:
            assert block.count("task_") == 1, f"{path.name}::{name} carries several task markers"


def test_parse_tasks():
    assert assignment.parse_tasks("2.1,1.1") == ["1.1", "2.1"]
    assert assignment.parse_tasks("3") == ["3.1", "3.2"]
    assert assignment.parse_tasks("all") == [t.id for t in assignment.TASKS]
    with pytest.raises(AssignmentError, match="unknown task '9.9'"):
        assignment.parse_tasks("9.9")


@pytest.fixture(scope="module")
def full_tree(tmp_path_factory):
    """A student tree with every task stubbed (made once for the tests that only read it)."""
    out = tmp_path_factory.mktemp("course") / "all"
    stubs = assignment.make(out, assignment.parse_tasks("all"))
    return out, stubs


def test_student_tree_of_every_task_is_valid_python_without_markers(full_tree):
    out, stubs = full_tree
    assert set(stubs) == {t.id for t in assignment.TASKS} and all(stubs.values())
    assert {p.name for p in out.iterdir()} >= {"minasgd", "kernels", "tests", "tutorials", "pyproject.toml", "README.md",
                                               "ASSIGNMENT.md", "conftest.py", ".assignment.json"}
    assert not (out / ".git").exists() and not (out / "runs").exists() and not list(out.rglob("__pycache__"))
    assert not (out / "tests" / "test_assignment.py").exists() and not (out / "tutorials" / "out").exists()
    for test in (out / "tests").glob("*.py"):  # what the shipped tests open next to tests/ is shipped too
        for name in re.findall(r'parent\.parent / "([^"]+)"', test.read_text()):
            assert (out / name).exists(), f"{test.name} needs {name}/, which the student tree lacks"
    todos = 0
    for path in out.rglob("*.py"):
        text = path.read_text()
        compile(text, str(path), "exec")
        rel = path.relative_to(out).parts
        if rel[:2] != ("minasgd", "assignment"):  # the tool's own docstrings show the markers
            assert not re.search(r"#\s*(BEGIN|END) SOLUTION", text), path
            todos += len(re.findall(r"# TODO\(task \d+\.\d+\)", text))
    assert todos == sum(n for files in assignment.catalogue(ROOT).values() for _, n in files)
    with pytest.raises(AssignmentError, match="not empty"):
        assignment.make(out, ["1.1"])


def test_no_answers_in_plain_sight(full_tree):
    """The tutorials are cut too (the tiled matmul of tutorial 3, the loop convolution of
    tutorial 2, the block reduction of tutorial 9), and the student README has no instructor
    commands and does not tell how to get the answers back."""
    out, stubs = full_tree
    for task, name in (("5.1", "03_shared_memory_tiling.py"), ("2.1", "02_convolution_three_ways.py"),
                       ("7.1", "09_block_reduction.py")):
        assert f"tutorials/{name}" in stubs[task], (task, stubs[task])
    tutorial3 = (out / "tutorials" / "03_shared_memory_tiling.py").read_text()
    assert "for k0 in range(0, k_dim, tile):" not in tutorial3 and "TODO(task 5.1)" in tutorial3
    tutorial1 = (out / "tutorials" / "01_threads_blocks_grids.py").read_text()
    assert "relu_forward_kernel(x, y):" not in tutorial1  # the verbatim listing of task 1.1 is gone
    readme = (out / "README.md").read_text()
    assert "ASSIGNMENT.md" in readme
    for word in ("restore", "assignment make", "assignment grade", "BEGIN SOLUTION"):
        assert word not in readme, word
    assert "instructor" in (out / "ASSIGNMENT.md").read_text()  # how grading works


def test_manifest_has_no_instructor_path_and_restore_keeps_the_task_list(tmp_path):
    tree = tmp_path / "student"
    assignment.make(tree, ["1.1", "3.1"])
    manifest = json.loads((tree / assignment.MANIFEST).read_text())
    assert str(ROOT) not in json.dumps(manifest) and "source" not in manifest
    assert manifest["tasks"] == ["1.1", "3.1"]
    # the student solves 3.1 by hand (edits its stub), then the instructor restores everything
    pool = tree / "kernels" / "pool.py"
    pool.write_text(pool.read_text().replace('raise NotImplementedError("task 3.1', 'pass  # mine ("task 3.1'))
    result = assignment.restore(tree, ["1.1", "3.1"])
    assert result == {"1.1": (2, 0), "3.1": (0, 1)}
    manifest = json.loads((tree / assignment.MANIFEST).read_text())
    assert manifest["tasks"] == ["1.1", "3.1"] and manifest["restored"] == ["1.1"]


def test_grading_uses_the_instructors_copy_of_everything_but_the_solution_regions(tmp_path):
    tree = tmp_path / "student"
    assignment.make(tree, ["1.1"])
    (tree / "minasgd" / "backends" / "numpy_backend.py").write_text("# fooled\n")
    (tree / "tests" / "test_cuda_kernels.py").write_text("# fooled\n")
    (tree / "kernels" / "elementwise.py").write_text((tree / "kernels" / "elementwise.py").read_text() + "# mine\n")
    work = tmp_path / "work"
    work.mkdir()
    assert list(assignment.grading_dir(tree, ROOT, work, "1.1")) == ["kernels/elementwise.py"]
    assert (work / "minasgd" / "backends" / "numpy_backend.py").read_text() == (ROOT / "minasgd" / "backends" / "numpy_backend.py").read_text()
    assert (work / "tests" / "test_cuda_kernels.py").read_text() == (ROOT / "tests" / "test_cuda_kernels.py").read_text()
    graded = (work / "kernels" / "elementwise.py").read_text()
    assert "# mine" not in graded and "TODO(task 1.1)" in graded  # only the regions are the student's (still stubs)
    assert graded == assignment.cut((ROOT / "kernels" / "elementwise.py").read_text(), {"1.1"})
    assert (work / "kernels" / "pool.py").read_text() == (ROOT / "kernels" / "pool.py").read_text()


def test_one_compile_child_serves_every_kernel_task_and_one_it_missed_is_checked_alone(monkeypatch, tmp_path):
    """The kernel tasks of a tree share one compile child; a task that child never reported on
    (it died on 3.2's code) is checked again in a child of its own, and so is each task after it;
    a task that kills its own child too is a one-line AssignmentError, not a grade."""
    from minasgd.assignment import grading

    row = dict(file="kernels/x.py", name="k", signature="s", first=1, last=9, error="")
    calls, deadly = [], {"3.2"}

    def child(action, workdir, site, env, timeout, jobs):
        calls.append([j["task"] for j in jobs])
        lines = []
        for j in jobs:
            if j["task"] in deadly:  # a compiler crash: the child dies without another word
                return subprocess.CompletedProcess([], -11, "\n".join(lines), "Segmentation fault")
            lines.append(json.dumps({"task": j["task"], "kernels": [row], "missing": ""}))
        return subprocess.CompletedProcess([], 0, "noise\n" + "\n".join(lines), "")

    monkeypatch.setattr(grading, "run_child", child)
    spans = {"kernels/x.py": [[3, 4]]}
    jobs = {t: (tmp_path, spans) for t in ("1.1", "3.2", "7.1")}
    deadly = set()
    assert grading.compile_regions(jobs, [], {}) == {t: ("", ["k"]) for t in jobs} and calls == [["1.1", "3.2", "7.1"]]
    calls.clear()
    deadly = {"3.2"}
    with pytest.raises(AssignmentError, match="the compile check did not run: Segmentation fault"):
        grading.compile_regions(jobs, [], {})
    assert calls == [["1.1", "3.2", "7.1"], ["3.2"]]
    calls.clear()
    deadly = {"never"}
    flaky = iter([True])  # the shared child dies once (on 3.2's code, say); alone, each task is reported

    def once(action, workdir, site, env, timeout, jobs):
        if next(flaky, False):
            calls.append([j["task"] for j in jobs])
            return subprocess.CompletedProcess([], -9, json.dumps({"task": "1.1", "kernels": [row], "missing": ""}), "")
        return child(action, workdir, site, env, timeout, jobs)

    monkeypatch.setattr(grading, "run_child", once)
    assert grading.compile_regions(jobs, [], {}) == {t: ("", ["k"]) for t in jobs}
    assert calls == [["1.1", "3.2", "7.1"], ["3.2"], ["7.1"]]


def test_short_failure_shows_the_first_mismatch():
    message = "AssertionError: relu forward: 3 of 105 elements differ; first at (0, 1, 2): got 0.0, expected 0.5\n  at (1, 1, 1): ..."
    assert assignment.short(message) == "AssertionError: relu forward: 3 of 105 elements differ; first at (0, 1, 2): got 0.0, expected 0.5"
    assert assignment.short("tid=[3, 0, 0] ctaid=[0, 0, 0]: boom\nmore") == "boom"
    assert assignment.short("AssertionError: 2 of 3 elements differ:\n  at (1,): got 2.0, expected 5.0") == \
        "AssertionError: 2 of 3 elements differ: at (1,): got 2.0, expected 5.0"


def test_cli_list_and_errors(capsys, tmp_path):
    assert cli.main(["assignment", "list"]) == 0
    assert "task_5_1" in capsys.readouterr().out
    assert cli.main(["assignment", "make", str(tmp_path / "x"), "--tasks", "7.7"]) == 2
    assert cli.main(["assignment", "restore", str(tmp_path)]) == 2
    assert "unknown task" in capsys.readouterr().out


def test_race_checker_catches_a_scatter_without_atomics():
    """The planted bug of task 3.2 (`+=` instead of cuda.atomic.add) must fail even on the
    simulator, naming both threads and the element. (Here, not in the shipped kernel tests: the
    planted kernel is most of the answer to 3.2.)"""
    if not config.ENABLE_CUDASIM:
        pytest.skip("the race checker runs on the CUDA simulator")
    sys.path.insert(0, str(ROOT / "tests"))
    from races import RaceError, racecheck

    @cuda.jit
    def scatter_plain(dy, argmax, dx):
        for idx in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
            at = argmax[0, 0, idx // 2, idx % 2]
            dx[0, 0, at // 5, at % 5] += dy[0, 0, idx // 2, idx % 2]  # no atomic: threads collide

    dx = cuda.to_device(np.zeros((1, 1, 5, 5), np.float32))
    with pytest.raises(RaceError) as caught:
        with racecheck():
            scatter_plain[1, 4](cuda.to_device(np.ones((1, 1, 2, 2), np.float32)),
                                cuda.to_device(np.full((1, 1, 2, 2), 12, np.int32)), dx)
    message = str(caught.value)
    assert "[0, 0, 2, 2]" in message and len(re.findall(r"thread \(\d+, 0, 0\)", message)) == 2, message


# ------------------------------------------------------------------ grading, end to end (pytest subprocesses)

ZERO_RELU = '''    for i in range(start, x.size, stride):
        y[i] = float32(0)
'''
FOOLED_REFERENCE = '''

def relu_forward(x):  # edited by the student: the "reference" now agrees with a kernel that writes zeros
    return np.zeros_like(x)
'''
PLAIN_ADD = "        dx[n, c, at // w_, at % w_] += dy[n, c, p, q]\n"
# 7.1 with a tree, finished by a plain += (a lost update between blocks)
TREE_PLAIN_FINISH = '''    half = BLOCK // 2
    while half > 0:
        if tid < half:
            partial[tid] += partial[tid + half]
        cuda.syncthreads()
        half //= 2
    if tid == 0:
        out[0] += partial[0]
'''


def solve_with(path, task, body, which=0):
    """Replace the `which`-th stub of `task` in a student file by `body`."""
    lines, out, seen, i = path.read_text().split("\n"), [], 0, 0
    while i < len(lines):
        if lines[i].strip().startswith(f"# TODO(task {task})"):
            if seen == which:
                out.append(body.rstrip("\n"))
                i += 2
                seen += 1
                continue
            seen += 1
        out.append(lines[i])
        i += 1
    path.write_text("\n".join(out))


@pytest.mark.slow
def test_fooled_reference_grades_fail_and_3_1_grades_alone(tmp_path):
    """Two holes, one grading run (tasks 1.1, 3.1, 3.2 of one tree):
    - 1.1: a ReLU kernel that writes zeros plus an edited NumPy relu_forward in the student tree
      (which graded PASS when grading used the student's whole minasgd/) must FAIL, and the
      failure must show the first mismatching element;
    - 3.1 solved while 3.2 is still a stub must PASS (one test carried both markers before).
    """
    tree = tmp_path / "student"
    assignment.make(tree, ["1.1", "3.1", "3.2"])
    elementwise = tree / "kernels" / "elementwise.py"
    solve_with(elementwise, "1.1", ZERO_RELU, which=0)
    solve_with(elementwise, "1.1", "    for i in range(start, dy.size, stride):\n        dx[i] = float32(0)\n", which=0)
    backend = tree / "minasgd" / "backends" / "numpy_backend.py"
    backend.write_text(backend.read_text() + FOOLED_REFERENCE)
    assignment.restore(tree, ["3.1"])
    grades = {g.task: g for g in assignment.grade(tree, ["1.1", "3.1", "3.2"])}
    assert not grades["1.1"].ok and grades["1.1"].failed, grades["1.1"]
    assert re.search(r"first at \(\d+(, \d+)*\): got 0\.0, expected \d", grades["1.1"].first_failure), grades["1.1"].first_failure
    assert grades["3.1"].ok and grades["3.1"].passed >= 5, grades["3.1"]
    assert not grades["3.2"].ok and "NotImplementedError: task 3.2" in grades["3.2"].first_failure, grades["3.2"]


@pytest.mark.slow
def test_missing_atomic_grades_fail_naming_the_two_threads(tmp_path):
    """`+=` instead of cuda.atomic.add gives the right numbers on the simulator (it passed before);
    under the race checker task 3.2 (and the block sum's atomic finish, task 7.1) must FAIL with a
    message naming the two threads and the element."""
    tree = tmp_path / "student"
    assignment.make(tree, ["3.2", "7.1"])
    solve_with(tree / "kernels" / "pool.py", "3.2", """    for idx in range(start, dy.size, step):
        q = idx % q_
        p = (idx // q_) % p_
        c = (idx // (q_ * p_)) % c_
        n = idx // (q_ * p_ * c_)
        at = argmax[n, c, p, q]
""" + PLAIN_ADD)
    solve_with(tree / "kernels" / "reduce.py", "7.1", TREE_PLAIN_FINISH)
    # seed 1234: how many random cases happen to send two windows' gradients to one pixel depends on the inputs
    grades = {g.task: g for g in assignment.grade(tree, ["3.2", "7.1"], seed=1234)}
    for task, least in (("3.2", 4), ("7.1", 2)):  # every case with overlapping windows / several blocks
        g = grades[task]
        assert not g.ok and g.failed >= least, g
        assert "race" in g.first_failure and re.search(r"\[\d+(, \d+)*\]", g.first_failure), g.first_failure
        assert len(re.findall(r"thread \(\d+, 0, 0\)", g.first_failure)) == 2, g.first_failure  # names both threads


@pytest.mark.slow
def test_round_trip_stubs_fail_their_grading_tests_and_restored_solutions_pass(tmp_path, capsys):
    """A kernel task and the parameter-server task: their stubs fail, restored solutions pass."""
    tree = tmp_path / "student"
    tasks = ["1.1", "6.1"]
    assert cli.main(["assignment", "make", str(tree), "--tasks", ",".join(tasks)]) == 0
    grades = {g.task: g for g in assignment.grade(tree, tasks)}
    for t in tasks:
        g = grades[t]
        assert not g.ok and g.passed == 0 and g.failed > 0, (t, g)
        assert f"task {t}" in g.first_failure and "NotImplementedError" in g.first_failure, g.first_failure

    assert cli.main(["assignment", "restore", str(tree)]) == 0
    assert "TODO(task" not in (tree / "kernels" / "elementwise.py").read_text()
    capsys.readouterr()
    assert cli.main(["assignment", "grade", str(tree), "--seed", "77"]) == 0  # the manifest still lists both tasks
    out = capsys.readouterr().out
    assert "2 of 2 task(s) pass" in out and "FAIL" not in out and "seed 77" in out


@pytest.mark.slow
def test_a_fully_solved_student_tree_passes_its_own_suite(tmp_path):
    """Every task stubbed, every answer restored: each file is the instructor's minus the markers,
    and the tree's own pytest collects everything and passes the tests that need the tree's
    layout (the tutorial index, the tutorials with exercises in them, the task tests)."""
    tree = tmp_path / "student"
    assignment.make(tree, assignment.parse_tasks("all"))
    assignment.restore(tree, assignment.parse_tasks("all"))
    for rel, _ in {f for files in assignment.catalogue(ROOT).values() for f in files}:
        assert (tree / rel).read_text() == assignment.cut((ROOT / rel).read_text(), set()), rel
    env_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    quiet = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")  # no xdist, hypothesis ... start-up in the child
    collected = subprocess.run(env_cmd + ["--collect-only"], cwd=tree, capture_output=True, text=True, timeout=300,
                               env=quiet)
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
    assert "error" not in collected.stdout.splitlines()[-1], collected.stdout[-2000:]
    run = subprocess.run(env_cmd + ["tests/test_tutorials.py", "-k", "listed or 03_ or 09_",
                                    "tests/test_cuda_kernels.py", "-k", "listed or 03_ or 09_ or block_sum or relu"],
                         cwd=tree, capture_output=True, text=True, timeout=600, env=quiet)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
