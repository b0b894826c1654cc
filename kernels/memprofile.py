"""What a GPU's memory system would make of a kernel, recorded on Numba's CUDA simulator.

The simulator runs every thread of a launch in Python and has no memory system, so it cannot
time anything. But the race checker (`racecheck`) already sees every element each thread
touches, and on a GPU what a load costs follows from those addresses alone:

* A warp (32 consecutive threads of a block, by linear thread id x + y*bx + z*bx*by) issues
  each memory instruction once for its 32 threads: one **request**.
* Global memory moves whole 32-byte **sectors**. A request costs as many sectors as its threads'
  addresses fall in: 32 consecutive floats need 4 (128 bytes, all used), 32 floats 32 apart
  need 32 (1,024 bytes moved for 128 used). **Coalescing efficiency** = the distinct bytes
  the warp asked for / the bytes of the sectors moved (1 = every moved byte was wanted).
* Shared memory has 32 **banks** of 4-byte words (word w is in bank w % 32). A request is
  served in as many passes (**ways**) as the largest number of DISTINCT words asked of one
  bank; threads reading the same word share it (a broadcast, free). 1 way = conflict-free.

So this module records, during a real simulated launch, the addresses of each request, and
counts. A request is identified by (block, warp, instruction, site, iteration): the
instruction is the kernel's source line with the array and the operation (load / store /
atomic); the site is the bytecode offset of the access in that line (`s[0] + s[j]` is two
requests); the iteration says which execution of the line this is, as a warp lines them up:
the thread's counts of the iterations of the loops around the line (or, outside any loop, of
the line itself). A line tracer on the kernel's frame counts them, from before its first line
(as a debugger would), so iteration n of one thread meets iteration n of the warp's other
threads even when a condition makes some of them skip a load or take the other branch in
some iterations (`dy[i] if y[i] > 0 else 0`, dropout's if / else in a grid-stride loop).

    from minasgd.kernels import memprofile

    with memprofile.profiling() as prof:
        gemm.gemm(a, b, version="tiled", tile=16)
    prof.summary("gemm_tiled")       # sectors per request, efficiency, conflict ways, bytes moved
    for s in prof.instructions("gemm_tiled"):
        print(s)                     # per source line: requests, sectors/request, ways

Every figure is **modelled**: it is what the addresses imply on a GPU with 32-byte sectors and
32 four-byte banks (every NVIDIA GPU since Maxwell), not a measurement. It ignores caches
(every request's sectors are counted as moved: an upper bound on DRAM traffic), allocation
alignment (every array is assumed to start on a 256-byte boundary, as cudaMalloc's do) and
the order warps run in. `roofline` turns FLOPs and modelled bytes into a lower bound on time
for a named GPU, from the peak numbers of NVIDIA's datasheets (`GPUS`).

Only the simulator can be profiled (set NUMBA_ENABLE_CUDASIM=1 before numba is imported);
kernels run several times slower under it than plain simulation: keep shapes tiny.
"""

import ast
import collections
import contextlib
import functools
import linecache
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy

from . import racecheck, simulator

WARP = 32  # threads per warp
SECTOR = 32  # bytes per global-memory sector
BANKS = 32  # shared-memory banks
BANK_BYTES = 4  # bytes per bank word

_RACECHECK_FILE = racecheck.__file__
_NOT_THE_KERNEL = (str(Path(numba.__file__).parent), str(Path(numpy.__file__).parent), threading.__file__,
                   _RACECHECK_FILE, simulator.__file__, __file__)  # the simulator's frames run before the kernel's


# ---------------------------------------------------------------- what a request costs

def sectors(byte_ranges):
    """How many 32-byte sectors the (allocation, offset, size) byte ranges of one request cover."""
    return len({(alloc, s) for alloc, offset, size in byte_ranges
                for s in range(offset // SECTOR, (offset + size - 1) // SECTOR + 1)})


def asked_bytes(byte_ranges):
    """How many distinct bytes the threads of one request asked for."""
    return len({(alloc, b) for alloc, offset, size in byte_ranges for b in range(offset, offset + size)})


def conflict_ways(byte_ranges):
    """Passes a shared-memory request needs: the most distinct 4-byte words asked of one bank.

    1 means conflict-free; a word several threads read is one word (a broadcast, free)."""
    words = {(alloc, w) for alloc, offset, size in byte_ranges
             for w in range(offset // BANK_BYTES, (offset + size - 1) // BANK_BYTES + 1)}
    per_bank = collections.Counter(w % BANKS for _, w in words)
    return max(per_bank.values(), default=0)


# ---------------------------------------------------------------- recording

@dataclass(frozen=True)
class Instruction:
    """One memory instruction of a kernel: a source line, the array it touches and how."""

    kernel: str
    file: str
    line: int
    array: str
    space: str  # "global" or "shared"
    op: str  # "load", "store" or "atomic"

    @property
    def source(self):
        return linecache.getline(self.file, self.line).strip()

    def __str__(self):
        return f"{Path(self.file).name}:{self.line} {self.op} {self.space} {self.array}: {self.source}"


OPS = {"read": "load", "write": "store", "atomic": "atomic"}


def _count_lines():
    """Start counting, in the simulated thread calling it, its executions of each line of the kernel.

    A line tracer goes on the first frame outside the simulator and threading (the kernel's);
    then tracing switches to `getattr` for every later frame: getattr(frame, "call", None) is
    None, so no other frame is traced, at the cost of a C call per call. Called by racecheck in
    each simulated thread before the kernel starts. Counts: `thread.memprofile_lines[0]`."""
    counts = collections.Counter()

    def count(frame, event, arg):
        if event == "line":
            counts[(frame.f_code.co_filename, frame.f_lineno)] += 1
        return count

    def on_call(frame, event, arg):
        if frame.f_code.co_filename.startswith(_NOT_THE_KERNEL):
            return None
        sys.settrace(getattr)
        return count

    threading.current_thread().memprofile_lines = (counts, count)
    sys.settrace(on_call)


def _line_counts(frame):
    """This simulated thread's executions of each (file, line) so far. A frame not traced yet (a device
    function's) gets the tracer at its first access, counting the line running now as one execution."""
    counts, count = threading.current_thread().memprofile_lines
    if frame.f_trace is not count:
        frame.f_trace = count
        counts[(frame.f_code.co_filename, frame.f_lineno)] += 1
    return counts


@functools.lru_cache(maxsize=None)
def _loops(file):
    """(header line, last line) of every for / while loop in a source file (none if it does not parse)."""
    try:
        tree = ast.parse("".join(linecache.getlines(file)))
    except (SyntaxError, ValueError):
        return ()
    return tuple((node.lineno, node.end_lineno) for node in ast.walk(tree) if isinstance(node, (ast.For, ast.While)))


def _iteration(counts, file, line):
    """Which execution of `line` this is, as a warp would line it up: the iteration counts of the
    loops around it (their header lines' executions), or the line's own count outside loops."""
    headers = sorted(h for h, end in _loops(file) if h < line <= end)
    return tuple(counts[(file, h)] for h in headers) or (counts[(file, line)],)


class Profile:
    """The requests of every kernel launched inside one `profiling()` block (a racecheck recorder)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.launches = []  # (kernel, grid, block), in launch order
        self._requests = collections.defaultdict(list)  # (launch, block, warp, Instruction, site, n) -> byte ranges

    def _start(self, kernel, grid=None, block=None):
        self.launches.append((kernel, grid, block))

    def _thread_started(self):
        _count_lines()

    def _access(self, space, key, access):
        """Called by the simulated thread doing `access`: file it under its warp's request."""
        frame = sys._getframe(1)
        while frame.f_code.co_filename == _RACECHECK_FILE:  # up to the kernel's own line
            frame = frame.f_back
        launch = len(self.launches) - 1
        kernel, _, (bx, by, _) = self.launches[launch]
        instruction = Instruction(kernel, frame.f_code.co_filename, frame.f_lineno, access.array, space,
                                  OPS[access.op])
        x, y, z = access.thread
        warp = (x + y * bx + z * bx * by) // WARP
        allocation = key[0] - access.offset  # the array's start: the same for every view of it
        site = frame.f_lasti  # which access of the line (the offset of its bytecode instruction)
        n = _iteration(_line_counts(frame), instruction.file, instruction.line)
        with self._lock:
            self._requests[(launch, access.block, warp, instruction, site, n)].append(
                (allocation, access.offset, access.size))

    # -- what was seen

    def kernels(self):
        """Names of the kernels launched, in order of first launch."""
        return list(dict.fromkeys(k for k, _, _ in self.launches))

    def instructions(self, kernel=None):
        """An `InstructionStats` per memory instruction of `kernel` (default: every kernel), in source order."""
        stats = {}
        in_order = sorted(self._requests, key=lambda r: (r[0], r[1], r[2], r[5], r[4]))  # launch, block, warp, n, site
        for request in in_order:
            ins = request[3]
            if kernel is None or ins.kernel == kernel:
                stats.setdefault(ins, InstructionStats(ins)).add(self._requests[request])
        return sorted(stats.values(), key=lambda s: (s.instruction.kernel, s.instruction.file, s.instruction.line,
                                                     s.instruction.array, s.instruction.op))

    def summary(self, kernel=None):
        """A `Summary` of `kernel`'s requests (default: every kernel launched), over all its launches."""
        total = Summary([k for k in self.kernels() if kernel is None or k == kernel],
                        sum(1 for k, _, _ in self.launches if kernel is None or k == kernel))
        for s in self.instructions(kernel):
            total.add(s)
        return total


@dataclass
class InstructionStats:
    """The requests of one instruction: how many, their sectors (global) or conflict ways (shared)."""

    instruction: Instruction
    requests: int = 0
    sectors: int = 0  # global: sectors moved, summed over requests
    asked: int = 0  # global: distinct bytes asked, summed over requests
    ways: list = field(default_factory=list)  # shared: the ways of each request

    def add(self, ranges):
        self.requests += 1
        if self.instruction.space == "global":
            self.sectors += sectors(ranges)
            self.asked += asked_bytes(ranges)
        else:
            self.ways.append(conflict_ways(ranges))

    @property
    def sectors_per_request(self):
        return self.sectors / self.requests if self.requests else 0.0

    @property
    def efficiency(self):
        """Distinct bytes asked / bytes moved (global), 1.0 at best."""
        return self.asked / (SECTOR * self.sectors) if self.sectors else 0.0

    @property
    def max_ways(self):
        return max(self.ways, default=0)

    @property
    def mean_ways(self):
        return sum(self.ways) / len(self.ways) if self.ways else 0.0

    def __str__(self):
        i = self.instruction
        cost = (f"{self.sectors_per_request:5.2f} sectors/request, {self.efficiency:4.0%} efficient"
                if i.space == "global" else f"{self.mean_ways:5.2f} ways/request (max {self.max_ways})")
        return f"{i.kernel} line {i.line:<4} {i.op:6} {i.space:6} {i.array:8} {self.requests:6} requests  {cost}   {i.source}"


@dataclass
class Summary:
    """One kernel's (or several kernels') requests added up. Loads are "load"; stores and atomics "store"."""

    kernels: list
    launches: int
    requests: dict = field(default_factory=collections.Counter)  # (space, "load"/"store") -> requests
    sectors: dict = field(default_factory=collections.Counter)  # ("global", op) -> sectors
    asked: dict = field(default_factory=collections.Counter)  # ("global", op) -> distinct bytes asked
    wavefronts: dict = field(default_factory=collections.Counter)  # ("shared", op) -> sum of ways
    max_ways: dict = field(default_factory=collections.Counter)  # ("shared", op) -> worst request

    def add(self, stats):
        i = stats.instruction
        key = (i.space, "load" if i.op == "load" else "store")
        self.requests[key] += stats.requests
        if i.space == "global":
            self.sectors[key] += stats.sectors
            self.asked[key] += stats.asked
        else:
            self.wavefronts[key] += sum(stats.ways)
            self.max_ways[key] = max(self.max_ways[key], stats.max_ways)

    def sectors_per_request(self, op):
        n = self.requests[("global", op)]
        return self.sectors[("global", op)] / n if n else None

    def efficiency(self, op):
        moved = SECTOR * self.sectors[("global", op)]
        return self.asked[("global", op)] / moved if moved else None

    def ways_per_request(self, op):
        n = self.requests[("shared", op)]
        return self.wavefronts[("shared", op)] / n if n else None

    @property
    def bytes_moved(self):
        """Global bytes moved: every sector of every request (no cache reuse)."""
        return SECTOR * sum(self.sectors.values())

    def as_dict(self):
        out = {"kernels": self.kernels, "launches": self.launches, "bytes_moved": self.bytes_moved}
        for op in ("load", "store"):
            out[f"global_{op}_requests"] = self.requests[("global", op)]
            out[f"global_{op}_sectors_per_request"] = self.sectors_per_request(op)
            out[f"global_{op}_efficiency"] = self.efficiency(op)
            out[f"shared_{op}_requests"] = self.requests[("shared", op)]
            out[f"shared_{op}_ways_per_request"] = self.ways_per_request(op)
            out[f"shared_{op}_max_ways"] = self.max_ways[("shared", op)] or None
        return out


@contextlib.contextmanager
def profiling():
    """Profile every kernel launched inside the block (simulator only); yields a `Profile`."""
    with racecheck.watching(Profile()) as profile:
        yield profile


# ---------------------------------------------------------------- roofline

@dataclass(frozen=True)
class GPU:
    name: str
    fp32_flops: float  # peak FLOP/s of plain FP32 arithmetic (no tensor cores: our kernels use none)
    bandwidth: float  # peak DRAM bytes/s
    source: str


GPUS = {
    "H200": GPU("NVIDIA H200 SXM", 67e12, 4.8e12,
                "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM): FP32 67 TFLOPS, GPU memory bandwidth 4.8 TB/s"),
    "A100": GPU("NVIDIA A100 80GB SXM", 19.5e12, 2.039e12,
                "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): FP32 19.5 TFLOPS, "
                "GPU memory bandwidth 2,039 GB/s"),
}


def roofline(flops, bytes_moved, gpu="H200"):
    """The roofline bound of a kernel doing `flops` and moving `bytes_moved` on `gpu` (a GPUS key):
    {"intensity" FLOP/byte, "seconds" (at least), "flops_per_s" (at most), "limit": "memory"/"compute"}."""
    g = GPUS[gpu]
    compute, memory = (flops or 0) / g.fp32_flops, bytes_moved / g.bandwidth
    seconds = max(compute, memory)
    return {"gpu": gpu, "intensity": (flops / bytes_moved) if flops and bytes_moved else None,
            "seconds": seconds, "flops_per_s": (flops / seconds) if flops and seconds else None,
            "limit": "compute" if compute > memory else "memory"}


# ---------------------------------------------------------------- a table of cases

def profile_cases(cases, gpu="H200"):
    """Profile each case, a (name, version, run, flops) tuple (flops None when not declared), one
    launch of `run()` each; returns one JSON-able row per case: its `Summary.as_dict()` and roofline."""
    rows = []
    for name, version, run, flops in cases:
        with profiling() as prof:
            run()
        summary = prof.summary()
        rows.append({"case": name, "version": version, **summary.as_dict(), "flops": flops,
                     "roofline": roofline(flops, summary.bytes_moved, gpu)})
    return rows


COLUMNS = ("case", "version", "kernels", "gld sect/req", "gld eff", "gst sect/req", "gst eff",
           "smem ld ways", "smem st ways", "FLOPs", "bytes moved", "FLOP/B", "roofline GFLOP/s", "limit")


def table_cells(row):
    """The cells of one `profile_cases` row, as strings, in COLUMNS order ("-": nothing to count)."""
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    r = row["roofline"]
    return [row["case"], row["version"], " ".join(row["kernels"]),
            num(row["global_load_sectors_per_request"], ".2f"), num(row["global_load_efficiency"], ".0%"),
            num(row["global_store_sectors_per_request"], ".2f"), num(row["global_store_efficiency"], ".0%"),
            num(row["shared_load_ways_per_request"], ".2f"), num(row["shared_store_ways_per_request"], ".2f"),
            num(row["flops"], ",.0f"), f"{row['bytes_moved']:,}", num(r["intensity"], ".2f"),
            num(r["flops_per_s"] and r["flops_per_s"] / 1e9, ",.0f"), r["limit"]]


def caption(gpu="H200"):
    g = GPUS[gpu]
    return (f"All figures modelled on the CUDA simulator from the addresses each warp touches (not measured). "
            f"sect/req: 32-byte sectors per warp request (4 = 32 coalesced floats); eff: bytes asked / bytes moved; "
            f"ways: shared-memory passes per warp request (1 = no bank conflict); bytes moved: every request's "
            f"sectors (no cache reuse); FLOPs declared by the case (2 per multiply-add; '-': memory-bound op, "
            f"not declared); roofline: the most FLOP/s those FLOPs and bytes allow, min(peak FP32, FLOP/B x peak "
            f"bandwidth), on the {g.name} ({g.source}); limit: which of the two binds.")


def format_table(rows, gpu="H200"):
    """A plain-text table of `profile_cases` rows (every figure modelled), with its caption."""
    cells = [list(COLUMNS)] + [table_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    return "\n".join(["modelled (CUDA simulator, not measured):", *lines, caption(gpu)])


def markdown_table(rows, gpu="H200"):
    """The same table in Markdown (docs/gpu.md)."""
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    return "\n".join(out + ["", caption(gpu)])
