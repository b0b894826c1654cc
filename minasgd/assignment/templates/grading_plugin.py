# ---- added for grading by `minasgd assignment grade`
import json as _json
import os as _os
from pathlib import Path as _Path

import pytest as _pytest

_TASKS = _json.loads(_os.environ["MINASGD_GRADE_TASKS"])  # {marker: keyword or None}
_GRADED = [str(_ROOT / f) for f in _json.loads(_os.environ.get("MINASGD_GRADE_FILES", "[]"))]  # kernel files
_KERNELS = _json.loads(_os.environ.get("MINASGD_GRADE_KERNELS", "[]"))  # the kernels holding the regions ([]: any)
_OWNERS, _RESULTS, _LAUNCHED = {}, {}, []


def pytest_sessionstart(session):
    """On the simulator, note each launch of a kernel (holding the task's regions) of a graded file."""
    if not _GRADED or _os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        return
    from numba.cuda.simulator import kernel

    launch = kernel.FakeCUDAKernel.__call__

    def noted_launch(self, *args):
        mine = not _KERNELS or self.fn.__name__ in _KERNELS
        if not self._device and mine and str(_Path(self.fn.__code__.co_filename).resolve()) in _GRADED:
            _LAUNCHED.append(self.fn.__name__)
        return launch(self, *args)

    kernel.FakeCUDAKernel.__call__ = noted_launch


def pytest_collection_modifyitems(config, items):
    keep = []
    for item in items:
        mine = [m for m, kw in _TASKS.items() if item.get_closest_marker(m) and (not kw or kw in item.name)]
        if mine:
            _OWNERS[item.nodeid] = mine
            keep.append(item)
    config.hook.pytest_deselected(items=[i for i in items if i.nodeid not in _OWNERS])
    items[:] = keep


@_pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    if call.when == "setup":
        _LAUNCHED.clear()
    outcome = yield
    report = outcome.get_result()
    if call.when == "call" and report.passed and _GRADED and _os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" \
            and not _LAUNCHED:
        report.outcome = "failed"
        report.longrepr = "the test passed without launching any kernel of the graded file(s) that holds the task's code"


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
