"""Grading a student tree: the reference tests, on the instructor's code with the student's stubbed files.

`grade` builds a throwaway folder from the SOURCE checkout this command runs from: its
`minasgd/`, `kernels/`, `tests/` and `pyproject.toml`, then copies over them only the student's
versions of the files that hold the graded tasks' solution regions (found in the reference
checkout, not read from the tree's manifest). So an edited NumPy reference, test or helper in the
student tree does not count. Then ONE pytest process runs the tests that carry the tasks'
markers (`task_1_1`, narrowed by the task's keyword), with the CUDA simulator on (`gpu=True`: a
real GPU), and a small plugin writes each test's outcome and failure message to a JSON file.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .tasks import BY_ID, AssignmentError
from .tree import IGNORE, graded_files, source_root, template


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


def grading_dir(tree, root, workdir, tasks):
    """Fill workdir with the reference code and tests, and the student's files of `tasks`; returns those files."""
    tree, workdir = Path(tree), Path(workdir)
    for name in ("minasgd", "kernels", "tests"):
        shutil.copytree(root / name, workdir / name, ignore=IGNORE)
    shutil.copy2(root / "pyproject.toml", workdir / "pyproject.toml")
    theirs = graded_files(root, tasks)
    for rel in theirs:
        if not (tree / rel).is_file():
            raise AssignmentError(f"{tree} has no {rel}: the student's work on task(s) {', '.join(tasks)} lives there")
        shutil.copy2(tree / rel, workdir / rel)
    (workdir / "conftest.py").write_text(template("student_conftest.py") + "\n" + template("grading_plugin.py"))
    return theirs


def test_files(workdir, tasks):
    """The test modules that carry a marker of `tasks` (pytest then collects only those)."""
    markers = [f"pytest.mark.{BY_ID[t].marker}" for t in tasks]
    return sorted(p.relative_to(workdir).as_posix() for p in (workdir / "tests").glob("test_*.py")
                  if any(m in p.read_text() for m in markers))


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
    grades = {t: Grade(t) for t in tasks}
    files = test_files(workdir, tasks)
    if not files:
        for g in grades.values():
            g.errors, g.first_failure = 1, "no grading tests found for this task"
        return list(grades.values())
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
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
        need = BY_ID[g.task].needs
        if not g.ok and need in grades and not grades[need].ok:
            g.first_failure = f"(needs task {need}, which fails too) {g.first_failure}"
    return list(grades.values())


def grade(tree, tasks, root=None, gpu=False):
    """Grade `tasks` of a student tree against the reference tests and code; returns [Grade]."""
    root = root or source_root()
    tree = Path(tree)
    for name in ("minasgd", "kernels"):
        if not (tree / name).is_dir():
            raise AssignmentError(f"{tree} has no {name}/ folder: not a minasgd student tree")
    with tempfile.TemporaryDirectory(prefix="minasgd-grade-") as tmp:
        workdir = Path(tmp)
        grading_dir(tree, root, workdir, tasks)
        return run_tests(workdir, tasks, gpu=gpu)
