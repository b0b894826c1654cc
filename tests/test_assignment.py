"""The assignment tool: markers, cutting and restoring text, a student tree, and the round trip
(make a tree, its grading tests fail, restore the solutions, they pass)."""

import re
from pathlib import Path

import pytest

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
    assert {"elementwise", "conv", "pooling", "softmax", "gemm", "parameter server"} <= families
    test_text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for t in assignment.TASKS:
        assert f"@pytest.mark.{t.marker}\n" in test_text, f"no grading test carries {t.marker}"


def test_parse_tasks():
    assert assignment.parse_tasks("2.1,1.1") == ["1.1", "2.1"]
    assert assignment.parse_tasks("3") == ["3.1", "3.2"]
    assert assignment.parse_tasks("all") == [t.id for t in assignment.TASKS]
    with pytest.raises(AssignmentError, match="unknown task '9.9'"):
        assignment.parse_tasks("9.9")


def test_student_tree_of_every_task_is_valid_python_without_markers(tmp_path):
    out = tmp_path / "course"
    stubs = assignment.make(out, assignment.parse_tasks("all"))
    assert set(stubs) == {t.id for t in assignment.TASKS} and all(stubs.values())
    assert {p.name for p in out.iterdir()} >= {"minasgd", "kernels", "tests", "pyproject.toml", "README.md",
                                               "ASSIGNMENT.md", "conftest.py", ".assignment.json"}
    assert not (out / ".git").exists() and not (out / "runs").exists() and not list(out.rglob("__pycache__"))
    todos = 0
    for path in out.rglob("*.py"):
        text = path.read_text()
        compile(text, str(path), "exec")
        if path.name != "assignment.py" and path.parts[-2] != "tests":  # those only show markers
            assert not re.search(r"#\s*(BEGIN|END) SOLUTION", text), path
            todos += len(re.findall(r"# TODO\(task \d+\.\d+\)", text))
    assert todos == sum(n for files in assignment.catalogue(ROOT).values() for _, n in files)
    with pytest.raises(AssignmentError, match="not empty"):
        assignment.make(out, ["1.1"])


def test_cli_list_and_errors(capsys, tmp_path):
    assert cli.main(["assignment", "list"]) == 0
    assert "task_5_1" in capsys.readouterr().out
    assert cli.main(["assignment", "make", str(tmp_path / "x"), "--tasks", "7.7"]) == 2
    assert cli.main(["assignment", "restore", str(tmp_path)]) == 2
    assert "unknown task" in capsys.readouterr().out


@pytest.mark.slow
def test_round_trip_stubs_fail_their_grading_tests_and_restored_solutions_pass(tmp_path, capsys):
    """One kernel task and the parameter-server task: ~30 s (two pytest runs on the simulator)."""
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
    assert cli.main(["assignment", "grade", str(tree), "--tasks", ",".join(tasks)]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 task(s) pass" in out and "FAIL" not in out
