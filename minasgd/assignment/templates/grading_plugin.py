# ---- added for grading by `minasgd assignment grade`
import json as _json
import os as _os

_TASKS = _json.loads(_os.environ["MINASGD_GRADE_TASKS"])  # {marker: keyword or None}
_OWNERS, _RESULTS = {}, {}


def pytest_collection_modifyitems(config, items):
    keep = []
    for item in items:
        mine = [m for m, kw in _TASKS.items() if item.get_closest_marker(m) and (not kw or kw in item.name)]
        if mine:
            _OWNERS[item.nodeid] = mine
            keep.append(item)
    config.hook.pytest_deselected(items=[i for i in items if i.nodeid not in _OWNERS])
    items[:] = keep


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
