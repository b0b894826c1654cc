"""Solution regions in source text: find them, cut them into stubs, put them back.

A region is a block of ordinary code between two comment lines at the code's indentation:

    # BEGIN SOLUTION task 1.1: the hint the student sees (one line)
    for i in range(start, x.size, stride):
        ...
    # END SOLUTION

Regions do not nest; a task may have several, in one file or several. Cutting replaces each
region of a selected task by a TODO comment (the hint) and `raise NotImplementedError(...)`,
and drops the marker lines of every other region, so the reference code runs unchanged.
"""

import difflib
import io
import re
import tokenize

from .tasks import BY_ID, AssignmentError

BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION task (?P<task>\d+\.\d+)(?::[ \t]*(?P<hint>.*?))?[ \t]*$")
END = re.compile(r"^(?P<indent>[ \t]*)# END SOLUTION[ \t]*$")
TODO = re.compile(r"^(?P<indent>[ \t]*)# TODO\(task (?P<task>\d+\.\d+)\)")
ANY_MARKER = re.compile(r"#\s*(BEGIN|END)\s+SOLUTION")


class Region:
    """One solution region: its task, hint, indentation and the line indexes of its markers."""

    def __init__(self, task, hint, indent, begin, end=-1):
        self.task, self.hint, self.indent, self.begin, self.end = task, hint, indent, begin, end

    def __repr__(self):
        return f"Region(task {self.task}, lines {self.begin + 1}-{self.end + 1})"


def find_regions(text, where="<text>"):
    """The solution regions of a source text, in order; AssignmentError on a malformed marker."""
    regions, open_ = [], None
    for i, line in enumerate(text.split("\n")):
        b, e = BEGIN.match(line), END.match(line)
        if b:
            if open_ is not None:
                raise AssignmentError(f"{where}:{i + 1}: BEGIN SOLUTION inside the region opened at line {open_.begin + 1}")
            open_ = Region(b["task"], b["hint"] or "", b["indent"], i)
        elif e:
            if open_ is None:
                raise AssignmentError(f"{where}:{i + 1}: END SOLUTION without a BEGIN")
            if e["indent"] != open_.indent:
                raise AssignmentError(f"{where}:{i + 1}: END SOLUTION is not indented like its BEGIN (line {open_.begin + 1})")
            open_.end = i
            regions.append(open_)
            open_ = None
        elif "SOLUTION" in line and ANY_MARKER.search(line):
            raise AssignmentError(f"{where}:{i + 1}: malformed marker (expected '# BEGIN SOLUTION task N.M: hint' or '# END SOLUTION')")
    if open_ is not None:
        raise AssignmentError(f"{where}:{open_.begin + 1}: BEGIN SOLUTION is never closed")
    return regions


def stub_lines(task, hint, indent):
    title = BY_ID[task].title if task in BY_ID else f"task {task}"
    return [f"{indent}# TODO(task {task}): {hint}".rstrip(), f'{indent}raise NotImplementedError("task {task}: {title}")']


def cut(text, stubbed, where="<text>"):
    """The student version of a source text: regions of `stubbed` tasks become stubs; all markers go."""
    lines = text.split("\n")
    out, pos = [], 0
    for r in find_regions(text, where):
        out.extend(lines[pos:r.begin])
        if r.task in stubbed:
            out.extend(stub_lines(r.task, r.hint, r.indent))
        else:
            out.extend(lines[r.begin + 1:r.end])
        pos = r.end + 1
    out.extend(lines[pos:])
    return "\n".join(out)


def restore_text(student, reference, tasks, where="<text>"):
    """Put the reference solutions of `tasks` back into a student file, stub by stub.

    The k-th stub of a task in the student file gets the k-th region of that task in the
    reference. Returns (new text, {task: stubs restored}, {task: stubs missing}); a stub the
    student has edited is left alone and counted as missing.
    """
    solutions = {}
    ref_lines = reference.split("\n")
    for r in find_regions(reference, where):
        solutions.setdefault(r.task, []).append(ref_lines[r.begin + 1:r.end])
    lines = student.split("\n")
    out, used, i = [], {}, 0
    while i < len(lines):
        m = TODO.match(lines[i])
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if m and m["task"] in tasks and "raise NotImplementedError" in nxt:
            k = used.get(m["task"], 0)
            if k < len(solutions.get(m["task"], [])):
                out.extend(solutions[m["task"]][k])
                used[m["task"]] = k + 1
                i += 2
                continue
        out.append(lines[i])
        i += 1
    missing = {t: len(solutions.get(t, [])) - used.get(t, 0) for t in tasks if len(solutions.get(t, [])) > used.get(t, 0)}
    return "\n".join(out), used, missing


# ------------------------------------------------------------------ grading: the student's regions only

def _region_problem(lines, indent):
    """Why the student's lines cannot stand where a region stood (None if they can).

    They must be whole statements (no string or bracket left open, so nothing after them is
    swallowed) and every statement must be indented at least like the region, so it stays
    inside the function the region is in (no module-level code: nothing of it runs at import).
    """
    text = "\n".join(lines) + "\n"
    depth = 0
    start = True
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.NEWLINE, tokenize.NL):
                start = depth == 0
                continue
            if tok.type in (tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
                continue
            if start and depth == 0 and tok.start[1] < len(indent.expandtabs()):
                return f"line {tok.start[0]} of your code is indented less than the stub was (it would leave the function)"
            start = False
            if tok.type == tokenize.OP and tok.string in "([{":
                depth += 1
            elif tok.type == tokenize.OP and tok.string in ")]}":
                depth -= 1
    except (tokenize.TokenError, IndentationError, SyntaxError) as e:
        return f"your code does not end where the stub ended ({e.args[0]})"
    return None


def merge_regions(reference, student, task, where="<text>"):
    """The reference text with the regions of `task` replaced by the student's code, and nothing else of theirs.

    The student file was cut from the reference: each region became a two-line stub that the
    student replaced. The k-th stub's replacement is what the student has between the lines
    that came just before and just after that stub (found by aligning the two texts); it must
    stay inside the region's function (see `_region_problem`). Edits anywhere else are ignored.
    Returns (merged text, [(first, last) line of each region's code in it]); AssignmentError
    when a stub cannot be found or the student's lines would leave the region's function.
    """
    regions = [r for r in find_regions(reference, where) if r.task == task]
    template = ["\0begin"] + cut(reference, {task}, where).split("\n") + ["\0end"]
    theirs = ["\0begin"] + student.split("\n") + ["\0end"]
    matched = {}  # template line -> student line, for lines the two texts share
    for a, b, n in difflib.SequenceMatcher(None, template, theirs, autojunk=False).get_matching_blocks():
        matched.update({a + i: b + i for i in range(n)})
    stubs = [i for i, line in enumerate(template) if TODO.match(line) and TODO.match(line)["task"] == task]
    assert len(stubs) == len(regions), (where, task)
    out, pos, spans = [], 1, []
    for k, (s, r) in enumerate(zip(stubs, regions)):
        before, after = matched.get(s - 1), matched.get(s + 2)
        if before is None or after is None or after <= before:
            raise AssignmentError(f"{where}: stub {k + 1} of task {task} cannot be found: the lines just before and "
                                  f"after it must stay as `make` left them")
        mine = theirs[before + 1:after]
        problem = _region_problem(mine, r.indent)
        if problem:
            raise AssignmentError(f"{where}: task {task}, stub {k + 1}: {problem}")
        out.extend(template[pos:s])
        spans.append((len(out) + 1, max(len(out) + len(mine), len(out) + 1)))
        out.extend(mine)
        pos = s + 2
    out.extend(template[pos:-1])
    merged = "\n".join(out)
    try:
        compile(merged, where, "exec")
    except SyntaxError as e:
        raise AssignmentError(f"{where}: task {task}: not valid Python once merged (line {e.lineno}: {e.msg})") from None
    return merged, spans
