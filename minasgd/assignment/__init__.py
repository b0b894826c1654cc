"""Course assignments cut from the real code, and graded by the real tests.

    minasgd assignment list                              the tasks, their files and grading tests
    minasgd assignment make OUTDIR --tasks 1.1,2.1       a student tree with those tasks stubbed out
    minasgd assignment grade OUTDIR [--tasks ...]        run each task's grading tests: a table
    minasgd assignment restore OUTDIR [--tasks ...]      put the reference solutions back (answer key)

The package, one job per module, all plain functions that return values (the command line,
flags and tables, is `minasgd/cli/assignment.py`):

    tasks.py      the tasks, their grading markers and their dependencies (the one place)
    markers.py    solution regions in source text: find, cut into stubs, restore, merge a student's back
    tree.py       a student tree: make it from the source checkout, restore answers into it
    grading.py    grade a tree: per task, the reference tests on the instructor's code with only the
                  student's solution regions merged in, kernels compiled for a GPU first
    child.py      what runs in the grading child processes (compile check, pytest, a probe)
    templates/    files written into trees: the student README, ASSIGNMENT.md, the root conftest.py
                  and the grading plugin

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
file or several, in `minasgd/`, `kernels/` (graded) or `tutorials/` (exercises: the tutorial's
check cell catches the NotImplementedError and goes on with the reference). Keep the set-up a
student should start from (thread indices, shared arrays) OUTSIDE the region.

In every copied file, each region of a selected task becomes, at the region's indentation,

    # TODO(task 1.1): grid-stride loop over i < x.size: y[i] = max(x[i], 0)
    raise NotImplementedError("task 1.1: ReLU forward and backward kernels")

and regions of the other tasks keep their code (their marker lines are dropped). A stubbed
module still imports, so every test still collects; only calling a stubbed function fails. A
stubbed kernel raises when launched on the CUDA simulator (which runs it as Python); on a real
GPU exceptions in kernels are ignored, the output stays unwritten and the tests, which pre-fill
outputs with NaN, fail.
"""

from .grading import Grade, grade, grading_dir, run_tests, short
from .markers import cut, find_regions, merge_regions, restore_text
from .tasks import BY_ID, TASKS, AssignmentError, Task, parse_tasks
from .tree import MANIFEST, catalogue, check_source_root, graded_files, make, read_manifest, restore, source_root

__all__ = ["AssignmentError", "BY_ID", "Grade", "MANIFEST", "TASKS", "Task", "catalogue", "check_source_root", "cut", "find_regions",
           "grade", "graded_files", "grading_dir", "make", "merge_regions", "parse_tasks", "read_manifest", "restore",
           "restore_text", "run_tests", "short", "source_root"]
