"""`minasgd assignment list|make|grade|restore`: the flags, and the package's plain functions
(`minasgd.assignment`) turned into calls, tables and lines."""

import secrets
import time
from pathlib import Path

from rich.markup import escape
from rich.table import Table


def add_arguments(p):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="the tasks, their files and grading tests")
    m = sub.add_parser("make", help="write a student tree with the chosen tasks stubbed out")
    m.add_argument("outdir", help="the folder to create")
    m.add_argument("--tasks", default="all", help="comma-separated task ids (1.1,2.1), a family number (3) or all (default)")
    m.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    g = sub.add_parser("grade", help="run the grading tests of each task of a student tree")
    g.add_argument("tree", help="the student tree")
    g.add_argument("--tasks", help="default: the tasks the tree was made with (pass them: the tree's list is the student's)")
    g.add_argument("--gpu", action="store_true", help="run the kernels on a real GPU instead of the simulator")
    g.add_argument("--seed", type=int, help="the seed of the tests' inputs (default: drawn now; the table says which)")
    r = sub.add_parser("restore", help="put the reference solutions back into a student tree")
    r.add_argument("tree", help="the student tree")
    r.add_argument("--tasks", help="default: every task the tree was made with")


def cmd_assignment(args, console):
    from ..assignment import AssignmentError

    try:
        return ACTIONS[args.action](args, console)
    except AssignmentError as e:
        console.print(f"[red]minasgd assignment {args.action}: {escape(str(e))}[/]", highlight=False, soft_wrap=True)
        return 2


def do_list(args, console):
    from ..assignment import TASKS, catalogue, source_root

    found = catalogue(source_root())
    table = Table(title="assignment tasks")
    for col in ("task", "family", "title", "practises", "files", "grading tests"):
        table.add_column(col)
    for t in TASKS:
        files = ", ".join(f"{f} ({n})" if n > 1 else f for f, n in found.get(t.id, [])) or "[red]no regions[/]"
        tests = f"-m {t.marker}" + (f" -k {t.keyword}" if t.keyword else "") + (f" (needs {t.needs})" if t.needs else "")
        tests += " + race checker" if t.race_checked else ""
        table.add_row(t.id, t.family, t.title, t.covers, files, tests)
    console.print(table)
    return 0


def do_make(args, console):
    from ..assignment import BY_ID, make, parse_tasks

    tasks = parse_tasks(args.tasks)
    stubs = make(args.outdir, tasks, force=args.force)
    for t in tasks:
        console.print(f"task {t} {BY_ID[t].title}: stubbed in {', '.join(stubs[t])}", highlight=False)
    console.print(f"wrote {args.outdir} ({len(tasks)} task(s)); students start with {args.outdir}/README.md and "
                  f"ASSIGNMENT.md; grade with: minasgd assignment grade {args.outdir}", highlight=False)
    return 0


def do_restore(args, console):
    from ..assignment import parse_tasks, read_manifest, restore

    manifest = read_manifest(args.tree)
    tasks = parse_tasks(args.tasks) if args.tasks else list(manifest["tasks"])
    for t, (done, missing) in restore(args.tree, tasks).items():
        note = f", [yellow]{missing} stub(s) not found (edited?)[/]" if missing else ""
        console.print(f"task {t}: restored {done} region(s){note}", highlight=False)
    return 0


def do_grade(args, console):
    from ..assignment import BY_ID, MANIFEST, AssignmentError, grade, parse_tasks, read_manifest
    from ..assignment.tasks import sort_tasks

    if args.tasks:
        tasks = parse_tasks(args.tasks)
    elif (Path(args.tree) / MANIFEST).is_file():
        tasks = sort_tasks(t for t in read_manifest(args.tree)["tasks"] if t in BY_ID)
    else:
        raise AssignmentError(f"{args.tree} has no {MANIFEST}; say which tasks with --tasks")
    if not tasks:
        raise AssignmentError("no tasks to grade")
    where = "real GPU" if args.gpu else "CUDA simulator"
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    started = time.perf_counter()
    with console.status(f"grading task(s) {', '.join(tasks)} ({where})"):
        grades = grade(args.tree, tasks, gpu=args.gpu, seed=seed)
    table = Table(title=f"{args.tree}: {where}, inputs from seed {seed} (--seed {seed} repeats them), "
                        f"{time.perf_counter() - started:.0f} s")
    for col in ("task", "title", "tests passed", "result", "first failure"):
        table.add_column(col, justify="right" if col == "tests passed" else "left", overflow="fold")
    for g in grades:
        result = "[green]PASS[/]" if g.ok else "[red]FAIL[/]"
        table.add_row(g.task, BY_ID[g.task].title, f"{g.passed}/{g.passed + g.failed + g.errors}", result,
                      escape(g.first_failure[:600]))
    console.print(table)
    passed = sum(g.ok for g in grades)
    console.print(f"{passed} of {len(grades)} task(s) pass", highlight=False)
    return 0 if passed == len(grades) else 1


ACTIONS = {"list": do_list, "make": do_make, "grade": do_grade, "restore": do_restore}
