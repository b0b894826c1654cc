"""The course's tasks: what each practises, and which tests grade it.

This is the ONE place where tasks and their dependencies are declared: `Task.needs` names a
task whose code the grading tests of this one also run. `make` writes it into ASSIGNMENT.md,
`list` shows it, and `grade` explains a failure by it. Grading tests are written so that each
task is graded alone wherever possible (3.2's tests take the argmax from the NumPy reference,
not from the student's 3.1 kernel), so today no task needs another.
"""

from dataclasses import dataclass


class AssignmentError(ValueError):
    """A problem an instructor can fix (a bad task list, a busy OUTDIR, a broken marker)."""


@dataclass(frozen=True)
class Task:
    id: str
    family: str
    title: str
    covers: str  # what the student practises
    keyword: str | None = None  # narrows the marked tests to those whose name contains it
    needs: str | None = None  # a task whose code the grading tests also call
    race_checked: bool = False  # graded under the race checker too (an atomic or a barrier is the point)
    host: bool = False  # Python run on the host, not a kernel: not compile-checked, graded last (docs/teaching.md)

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
         "overlapping windows: a race between threads, fixed with cuda.atomic.add", race_checked=True),
    Task("4.1", "softmax", "Softmax cross-entropy loss and gradient",
         "one thread per row, the max-subtraction that keeps exp finite, softmax - onehot"),
    Task("5.1", "gemm", "Shared-memory tiled GEMM",
         "tiling: stage A and B slabs in shared memory, two syncthreads per slab, transposed operands",
         keyword="tiled", race_checked=True),
    Task("6.1", "parameter server", "Apply a push: the update, version and staleness accounting",
         "the server side of async SGD: staleness = mini-batches applied since the worker fetched; "
         "with staleness_lr, a push of k mini-batches that is s stale is scaled by k / (k + s)", host=True),
    Task("7.1", "reduction", "Block sum: a shared-memory tree, then an atomic finish",
         "halving the partial sums with a barrier per step; one atomic add per block", race_checked=True),
)
BY_ID = {t.id: t for t in TASKS}


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
    return sort_tasks(chosen)


def sort_tasks(ids):
    return sorted(ids, key=lambda t: tuple(int(x) for x in t.split(".")))
