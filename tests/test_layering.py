"""One-way floors: every import in minasgd/ and kernels/ points down (or sideways), never up.

    floor 0  minasgd.kernels        the Numba CUDA kernels, their shape checks and the dropout hash
    floor 1  minasgd.backends       the op contract: NumPy reference and CUDA backend
    floor 2  model, layers, optim, data, checkpoint, rundir, config, ...   (the library)
    floor 3  train, ps, experiments, bench_*, workbench, assignment        (things that run)
    floor 4  cli (the command-line package), dashboard (the one rendering module)

Rules, read from the source with `ast` (lazy imports inside functions count too):
  * no module imports a module on a floor above its own;
  * `argparse` only in the command-line package, `rich` only there and in the dashboard;
  * no import cycle between modules;
  * no private name (`_x`) imported from a module on another floor.
A new module must be given a floor in FLOORS, or the test fails.

One exception, narrow on purpose: a module's `if __name__ == "__main__":` block runs only when
the file is executed, never on import, so it may import the workbench (`minasgd.workbench`):
that is how `python -m minasgd.kernels.conv` runs the llm.c-style validate-and-time loop while
importing kernels/ still pulls in nothing above it. Any other import in such a block is checked
like the rest, and entry-point imports never count towards cycles.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Module-name prefix -> floor; the longest matching prefix wins.
FLOORS = {
    "minasgd.kernels": 0,
    "minasgd.backends": 1,
    "minasgd": 2,  # the package itself, __init__ only
    "minasgd.model": 2, "minasgd.layers": 2, "minasgd.optim": 2, "minasgd.data": 2, "minasgd.checkpoint": 2,
    "minasgd.rundir": 2, "minasgd.config": 2, "minasgd.torch_reference": 2,
    "minasgd.timer": 2,
    "minasgd.train": 3, "minasgd.ps": 3, "minasgd.experiments": 3, "minasgd.bench_step": 3,
    "minasgd.bench_kernels": 3, "minasgd.workbench": 3, "minasgd.assignment": 3,
    "minasgd.cli": 4, "minasgd.dashboard": 4, "minasgd.__main__": 4,
}
TOP = 4
ENTRY_POINT_IMPORTS = ("minasgd.workbench",)  # what a __main__ block may import from any floor
ARGPARSE_HOMES = ("minasgd.cli",)
RICH_HOMES = ("minasgd.cli", "minasgd.dashboard")

# Breaches that are being fixed elsewhere right now, each with its reason. ONLY modules under
# minasgd/ps/ and minasgd/assignment* may appear here (checked below); an entry that is no longer
# a breach fails `test_allowlist_is_not_stale`, so the list only shrinks. Keys: (importer, what),
# where `what` is an imported module, "rich", "argparse", or "module._private".
ALLOWED = {
}


def module_files():
    """{module name: path} for every module of the package (kernels/ is installed as minasgd.kernels)."""
    files = {}
    for base, prefix in ((ROOT / "minasgd", "minasgd"), (ROOT / "kernels", "minasgd.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([prefix, *parts])] = path
    return files


def floor_of(module):
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else FLOORS[best]


def home(module, homes):
    return any(module == h or module.startswith(h + ".") for h in homes)


def _is_main_block(node):
    """`if __name__ == "__main__":` at the top of a module."""
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and len(t.comparators) == 1 and isinstance(t.comparators[0], ast.Constant)
            and t.comparators[0].value == "__main__")


def imports(module, path, modules, entry_points=False):
    """[(what, lineno)]: imported package modules ("minasgd.x", or "minasgd.x._name" for a
    private name), and the top-level names of outside packages ("rich", "numpy", ...).
    Imports inside the module's `if __name__ == "__main__":` block are left out, unless
    entry_points, which returns only those."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    mains = [n for n in tree.body if _is_main_block(n)]
    roots = mains if entry_points else [ast.Module(body=[n for n in tree.body if not _is_main_block(n)], type_ignores=[])]
    nodes = [node for root in roots for node in ast.walk(root)]
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((_known(alias.name, modules), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:
                    found.append((sub, node.lineno))
                else:
                    target = _known(source, modules)
                    found.append((target, node.lineno))
                    if alias.name.startswith("_") and target in modules:
                        found.append((f"{target}.{alias.name}", node.lineno))
    return found


def _known(name, modules):
    """The longest importable prefix of `name` that is one of our modules, or its top-level package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return parts[0]


def graph():
    modules = module_files()
    return modules, {m: imports(m, p, modules) for m, p in modules.items()}


def entry_point_imports():
    """{module: [(what, lineno)]} of the imports inside `if __name__ == "__main__":` blocks."""
    modules = module_files()
    return modules, {m: imports(m, p, modules, entry_points=True) for m, p in modules.items()}


def breaches(modules, edges):
    """{(importer, what): message} for every rule broken, cycles aside."""
    found = {}
    for m, targets in edges.items():
        here = floor_of(m)
        for what, line in targets:
            where = f"{modules[m].relative_to(ROOT)}:{line}"
            if what == "argparse" and not home(m, ARGPARSE_HOMES):
                found[(m, what)] = f"{where}: argparse outside the command-line package"
            elif what == "rich" and not home(m, RICH_HOMES):
                found[(m, what)] = f"{where}: rich outside the command-line package and the dashboard"
            elif what.rpartition(".")[2].startswith("_") and what.rpartition(".")[0] in modules:
                owner = what.rpartition(".")[0]
                if floor_of(owner) != here:
                    found[(m, what)] = f"{where}: private name {what} taken across floors"
            elif what in modules and what != m and not m.startswith(what + "."):
                there = floor_of(what)
                if there is not None and here is not None and there > here:
                    found[(m, what)] = f"{where}: {m} (floor {here}) imports {what} (floor {there})"
    return found


def cycles(edges, skip=()):
    """Strongly connected components of more than one module (Tarjan), ignoring the `skip` edges.

    A package's own submodules importing the package (`from . import Dataset`) count: that is a
    cycle when the package's __init__ imports them back.
    """
    adj = {m: sorted({w for w, _ in ts if w in edges and w != m and (m, w) not in skip}) for m, ts in edges.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(adj):
        if v not in index:
            visit(v)
    return out


# ---------------------------------------------------------------- the tests

def test_every_module_has_a_floor():
    modules = module_files()
    assert [m for m in modules if floor_of(m) is None] == []
    assert "minasgd.kernels.conv" in modules and "minasgd.train" in modules  # the walk found the tree


def test_imports_point_down():
    modules, edges = graph()
    found = breaches(modules, edges)
    assert sorted(msg for key, msg in found.items() if key not in ALLOWED) == []


def test_entry_points_import_only_the_workbench_from_above():
    modules, entries = entry_point_imports()
    above = {}
    for m, targets in entries.items():
        for what, line in targets:
            if what in modules and what not in ENTRY_POINT_IMPORTS and floor_of(what) > floor_of(m):
                above[(m, what)] = line
    assert above == {}
    kernels_with_main = sorted(m for m, ts in entries.items() if m.startswith("minasgd.kernels") and ts)
    from minasgd.kernels.registry import FAMILIES  # every op family has its workbench

    assert kernels_with_main == sorted(f"minasgd.kernels.{op}" for op in FAMILIES)


def test_no_import_cycles():
    modules, edges = graph()
    assert cycles(edges, skip=set(ALLOWED)) == []


def test_kernels_import_nothing_above_them():
    """kernels/ stands alone: numpy, numba and itself, nothing else (not even the allowlist helps)."""
    modules, edges = graph()
    outside = {(m, w) for m, ts in edges.items() if m.startswith("minasgd.kernels")
               for w, _ in ts if w.startswith("minasgd") and not w.startswith("minasgd.kernels")}
    assert outside == set()


def test_allowlist_only_covers_ps_and_assignment():
    assert [m for m, _ in ALLOWED if not (m.startswith("minasgd.ps.") or m.startswith("minasgd.assignment"))] == []
    assert all(reason.strip() for reason in ALLOWED.values())


def test_allowlist_is_not_stale():
    """Every allowlisted breach still exists: when ps/ or assignment is fixed, delete its line here."""
    modules, edges = graph()
    found = set(breaches(modules, edges))
    edge_set = {(m, w) for m, ts in edges.items() for w, _ in ts}
    assert sorted(key for key in ALLOWED if key not in found and key not in edge_set) == []


def test_the_checker_catches_planted_violations(tmp_path):
    """Each rule fires on a planted breach (so a green run means something)."""
    modules, edges = graph()
    planted = dict(edges)
    planted["minasgd.kernels.conv"] = edges["minasgd.kernels.conv"] + [("minasgd.model", 1)]
    planted["minasgd.model"] = edges["minasgd.model"] + [("argparse", 1), ("rich", 2)]
    planted["minasgd.optim"] = edges["minasgd.optim"] + [("minasgd.train._private", 3)]
    found = breaches(modules, planted)
    assert {("minasgd.kernels.conv", "minasgd.model"), ("minasgd.model", "argparse"), ("minasgd.model", "rich"),
            ("minasgd.optim", "minasgd.train._private")} <= set(found)
    planted["minasgd.layers"] = edges["minasgd.layers"] + [("minasgd.model", 1)]  # model -> layers -> model
    assert ["minasgd.layers", "minasgd.model"] in cycles(planted)


# ---------------------------------------------------------------- clients never import the server

# A worker's side of the parameter server: what it needs is the wire vocabulary (`ps/protocol.py`)
# and the conversation (`ps/session.py`), never the server's internals. `ps/tcp.py` and `ps/mpi.py`
# hold a client and a server side each; neither side needs the server module.
CLIENT_MODULES = ("minasgd.ps.session", "minasgd.ps.worker", "minasgd.ps.tcp_client", "minasgd.ps.tcp",
                  "minasgd.ps.mpi_client", "minasgd.ps.mpi", "minasgd.ps.protocol")
SERVER_MODULE = "minasgd.ps.server"


def reaches(edges, start, target):
    """The import chain from `start` to `target` (a list of modules), or None: imports anywhere in
    the module, lazy ones inside functions included, followed transitively."""
    seen, stack = {start}, [[start]]
    while stack:
        path = stack.pop()
        for what, _ in edges.get(path[-1], ()):
            if what == target:
                return path + [what]
            if what in edges and what not in seen:
                seen.add(what)
                stack.append(path + [what])
    return None


def test_client_modules_never_import_the_server():
    modules, edges = graph()
    assert all(m in modules for m in CLIENT_MODULES + (SERVER_MODULE,))
    chains = {m: reaches(edges, m, SERVER_MODULE) for m in CLIENT_MODULES}
    assert {m: chain for m, chain in chains.items() if chain} == {}


def test_the_client_check_catches_a_planted_server_import():
    modules, edges = graph()
    planted = dict(edges)
    planted["minasgd.ps.protocol"] = edges["minasgd.ps.protocol"] + [(SERVER_MODULE, 1)]
    assert reaches(planted, "minasgd.ps.tcp", SERVER_MODULE)[-2:] == ["minasgd.ps.protocol", SERVER_MODULE]
    planted = dict(edges, **{"minasgd.ps.worker": edges["minasgd.ps.worker"] + [(SERVER_MODULE, 9)]})
    assert reaches(planted, "minasgd.ps.worker", SERVER_MODULE) == ["minasgd.ps.worker", SERVER_MODULE]


def test_clients_do_not_reach_the_server_by_a_name_in_a_string():
    """An attack on the import check: `importlib.import_module("minasgd.ps.server")` (or
    `__import__`) is no import statement, so the graph would not see it; no client names it."""
    modules = module_files()
    for m in CLIENT_MODULES:
        text = modules[m].read_text()
        strings = {n.value for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not {s for s in strings if s == SERVER_MODULE or s.endswith(".server")}, m
        assert "import_module" not in text and "__import__" not in text, m
