"""Student trees: cut one from the source checkout (`make`), put answers back (`restore`).

A student tree holds copies of the checkout's `minasgd/`, `kernels/`, `tests/`, `tutorials/`,
`.ci/` (the CI scripts some tests run) and `pyproject.toml` (no .git, runs/, data/, caches,
instructor docs), a student README (no
instructor commands), ASSIGNMENT.md, a root `conftest.py` that makes the tree's own code the
one imported, and `.assignment.json` (the tasks it was made with and the stubbed files; no
paths of the instructor's machine).
"""

import json
import shutil
import string
import subprocess
import time
from importlib import resources
from pathlib import Path

from .markers import cut, find_regions, restore_text
from .tasks import BY_ID, AssignmentError

COPY = ("minasgd", "kernels", "tests", "tutorials", ".ci", "pyproject.toml")  # what a student tree holds
SCANNED = ("minasgd", "kernels", "tutorials")  # where solution regions may live
GRADED = ("minasgd", "kernels")  # stubs here are graded; those in tutorials/ are exercises
# Caches, tutorial outputs, and this tool's own tests (instructor tooling: they need the markers, and the
# attacks on the grader hold answers).
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", "*.nbi", "*.nbc",
                                "test_assignment.py", "test_assignment_*.py", "out")
MANIFEST = ".assignment.json"
OWN_PACKAGE = ("minasgd", "assignment")  # its docstrings and templates show markers: not solution files


def template(name):
    return resources.files(__package__).joinpath("templates", name).read_text()


# ------------------------------------------------------------------ the source checkout

def source_root():
    """The source checkout this minasgd runs from (it holds kernels/ and tests/ next to minasgd/)."""
    return check_source_root(Path(__file__).resolve().parent.parent.parent)


def check_source_root(root):
    """`root` if it is an instructor's source checkout; AssignmentError for anything else, a student tree too."""
    root = Path(root)
    if not ((root / "kernels").is_dir() and (root / "tests").is_dir() and (root / "pyproject.toml").is_file()):
        raise AssignmentError(f"minasgd assignment needs a source checkout (git clone, then pip install -e .); "
                              f"{root} has no kernels/ and tests/")
    if (root / MANIFEST).exists():
        raise AssignmentError(f"{root} holds {MANIFEST}: it is a student tree, not the instructor's checkout "
                              f"(run minasgd assignment from your own checkout's installation)")
    return root


def python_files(root, tops=SCANNED):
    for top in tops:
        base = root / top
        if base.is_dir():
            for path in sorted(base.rglob("*.py")):
                rel = path.relative_to(root).parts
                if "__pycache__" not in rel and rel[:2] != OWN_PACKAGE:
                    yield path


def catalogue(root, tops=SCANNED):
    """{task id: [(relative path, number of regions)]} for every region in the checkout."""
    found = {}
    for path in python_files(root, tops):
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


def graded_files(root, tasks):
    """The files a student's work on `tasks` lives in, from the REFERENCE checkout (not the tree's manifest)."""
    found = catalogue(root, GRADED)
    return sorted({rel for t in tasks for rel, _ in found.get(t, [])})


def git_commit(root):
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------ make

def make(outdir, tasks, root=None, force=False):
    """Write a student tree for `tasks` to outdir; returns {task: [files with stubs]}."""
    root = check_source_root(root or source_root())
    outdir = Path(outdir)
    found = catalogue(root)
    lost = [t for t in tasks if t not in found]
    if lost:
        raise AssignmentError(f"no solution regions for task(s) {', '.join(lost)} in the source checkout")
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
    (outdir / "conftest.py").write_text(template("student_conftest.py"))
    write_manifest(outdir, {"tasks": list(tasks), "restored": [], "files": stubs, "commit": git_commit(root),
                            "made": time.strftime("%Y-%m-%d %H:%M:%S")})
    (outdir / "ASSIGNMENT.md").write_text(assignment_md(tasks, stubs))
    (outdir / "README.md").write_text(student_readme(outdir))
    return stubs


def assignment_md(tasks, stubs):
    rows = []
    for t in tasks:
        task = BY_ID[t]
        tests = f"`python -m pytest -m {task.marker}" + (f" -k {task.keyword}`" if task.keyword else "`")
        needs = f" (its tests also run task {task.needs}: do that first)" if task.needs in tasks else ""
        files = [f"`{f}`" for f in stubs[t] if not f.startswith("tutorials/")]
        exercises = [f"`{f}` (exercise)" for f in stubs[t] if f.startswith("tutorials/")]
        rows.append(f"| {t} | {task.title}: {task.covers}{needs} | {', '.join(files + exercises)} | {tests} |")
    raced = [t for t in tasks if BY_ID[t].race_checked]
    race_note = (f"Tasks {', '.join(raced)} also run under a race checker: two threads writing one element "
                 "without an atomic, or a thread reading shared memory another thread wrote since the last "
                 "`cuda.syncthreads()`, fails the task even when the numbers come out right on the simulator."
                 if raced else "")
    return string.Template(template("ASSIGNMENT.md")).substitute(table="\n".join(rows), race_note=race_note)


def student_readme(tree):
    tutorials = sorted(p.name for p in (Path(tree) / "tutorials").glob("[0-9][0-9]_*.py"))
    listing = "\n".join(f"- [tutorials/{name}](tutorials/{name})" for name in tutorials)
    return string.Template(template("README.md")).substitute(tutorials=listing)


def write_manifest(tree, manifest):
    (Path(tree) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(tree):
    path = Path(tree) / MANIFEST
    if not path.is_file():
        raise AssignmentError(f"{tree} is not a student tree made by `minasgd assignment make` (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("tasks"), list):
            raise ValueError("no task list")
    except ValueError as e:
        raise AssignmentError(f"{path}: not a valid manifest ({e})") from None
    return manifest


# ------------------------------------------------------------------ restore

def restore(tree, tasks, root=None):
    """Put the reference solutions of `tasks` back into a student tree. Returns {task: (restored, missing)}.

    The manifest's task list (what `grade` checks by default) stays what the tree was made with;
    the restored tasks are recorded beside it.
    """
    root = check_source_root(root or source_root())
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
    manifest["restored"] = sorted(set(manifest.get("restored", [])) | {t for t in tasks if result[t][0]})
    write_manifest(tree, manifest)
    return {t: tuple(v) for t, v in result.items()}
