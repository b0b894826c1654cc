"""Everything minasgd draws on a terminal (rich), in one place: the library reports, this shows.

    TrainProgress   the live view of `minasgd train`: a bar per epoch with loss and images/s, a
                    line per epoch; it is the `on_event` callback of `minasgd.train.train`
    TaskBars        transient bars for `progress(what, done, total)` callbacks (datasets)
    SweepView       the `on_event` callback of `minasgd.experiments.runner.run_sweep`
    ServerView      the `on_event` callback of the parameter server's runs (`minasgd.ps.launcher`,
                    `minasgd.ps.mpi`): their lines, and ServerDashboard live while it serves
    ServerDashboard one frame of the live server dashboard, drawn from a `minasgd.ps.monitor.Monitor`
                    (these two and the `bench ps` tables are in `dashboard/server.py`)
    *_table, show_* the tables of `minasgd model`, `bench step | kernels | ps`, `experiment`

Nothing below the command line imports this module: training, the datasets and the sweeps run
the same with no terminal at all (a test, a notebook, an MPI rank).
"""

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .server import ServerDashboard, ServerView, show_bench_ps, show_bench_ps_hostile, staleness_summary  # noqa: F401


class TaskBars:
    """A `progress(what, done, total)` callback drawing one transient bar per `what`.

        with TaskBars(console) as bars:
            data.load("shapes", progress=bars)
    """

    def __init__(self, console=None, disable=False):
        self.console = console or Console()
        self.disable = disable
        self.bars = None
        self.tasks = {}

    def __call__(self, what, done, total):
        if self.disable:
            return
        if self.bars is None:
            columns = [TextColumn("{task.description}"), BarColumn()]
            columns += ([DownloadColumn(), TransferSpeedColumn()] if "bytes" in what else [MofNCompleteColumn()])
            self.bars = Progress(*columns, TimeRemainingColumn(), console=self.console, transient=True)
            self.bars.start()
        if what not in self.tasks:
            self.tasks[what] = self.bars.add_task(what.replace(" (bytes)", ""), total=total)
        self.bars.update(self.tasks[what], completed=done)
        if total is not None and done >= total:
            self.close()

    def close(self):
        if self.bars is not None:
            self.bars.stop()
        self.bars, self.tasks = None, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class TrainProgress:
    """The live view of a training run: a bar per epoch with loss and images/s, a line per epoch.

    Use it as `on_event` of `minasgd.train.train` (inside `with`), or call its methods directly
    (the parameter server's launcher does: say, start_epoch, update, end_epoch).
    """

    def __init__(self, quiet=False, console=None):
        self.quiet = quiet
        self.console = console or Console()
        self.bars = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
            TimeRemainingColumn(), console=self.console, disable=quiet, transient=False,
        )
        self.tasks = TaskBars(self.console, disable=quiet)
        self.bar = None

    def say(self, text):
        if not self.quiet:
            self.console.print(text)

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        self.tasks.close()
        return self.bars.__exit__(*exc)

    def start_epoch(self, epoch, epochs, steps):
        return self.bars.add_task("", total=steps, epoch=f"{epoch}/{epochs}", loss=float("nan"), ips=0.0)

    def update(self, bar, completed, loss, ips):
        self.bars.update(bar, completed=completed, loss=loss, ips=ips)

    def end_epoch(self, bar, record):
        self.bars.update(bar, completed=self.bars.tasks[bar].total)
        self.say(f"  epoch {record['epoch']}: test accuracy {record['test_accuracy']:.2%}, "
                 f"test loss {record['test_loss']:.3f}, {record['images_per_second']:.0f} img/s")

    def __call__(self, event):
        """Show one event of `minasgd.train.train`."""
        kind = event["kind"]
        if kind == "backend":
            self.say(f"backend: {event['name']} on {event['device']}")
        elif kind == "threads":
            self.say(event["text"])
        elif kind == "progress":
            self.tasks(event["what"], event["done"], event["total"])
        elif kind == "warm_start":
            self.say(f"warm start from {event['init']} ({event['steps']} steps trained)")
        elif kind == "start":
            self.tasks.close()
            self.say(f"model {event['model']}: {event['num_params']:,} parameters; dataset {event['dataset']}: "
                     f"{event['train_images']:,} train / {event['test_images']:,} test; run dir {event['run_dir']}")
        elif kind == "epoch_start":
            self.bar = self.start_epoch(event["epoch"], event["epochs"], event["steps"])
        elif kind == "step":
            self.update(self.bar, event["batch"], loss=event["loss"], ips=event["images_per_second"])
        elif kind == "epoch":
            self.end_epoch(self.bar, event)
        elif kind == "done":
            s = event["summary"]
            self.say(f"done: test accuracy {s['test_accuracy']:.2%}, {s['wall_seconds']:.0f} s, "
                     f"{s['images_per_second']:.0f} images/s -> {event['run_dir']}")


# ---------------------------------------------------------------- tables

def model_table(model):
    """`minasgd model`: the layers of a network."""
    info = model.describe()
    table = Table(title=f"{model.name}: {model.num_params:,} parameters, "
                        f"{model.flops_per_image() / 1e6:.1f} MFLOP per image (forward)")
    for col in ("layer", "type", "input", "output", "kernel/stride/pad", "params", "MFLOP"):
        table.add_column(col, justify="right" if col in ("params", "MFLOP") else "left")
    for layer in info["layers"]:
        geometry = ""
        if "kernel" in layer:
            geometry = f"{layer['kernel']}x{layer['kernel']} / {layer['stride']} / {layer.get('pad', 0)}"
        elif "p" in layer:
            geometry = f"p = {layer['p']}"
        table.add_row(layer["name"], layer["type"], "x".join(map(str, layer["in_shape"])),
                      "x".join(map(str, layer["out_shape"])), geometry,
                      f"{layer.get('params', 0):,}", f"{layer.get('flops', 0) / 1e6:.2f}")
    return table


def _our_threads_label(row):
    """'2 threads, 1 BLAS': our own threads (loops and convolution chunks) and BLAS's."""
    ours = f"{row['our_threads']} threads, " if "our_threads" in row else ""
    return f"{ours}{row['blas_threads'] or '?'} BLAS"


def show_bench_step(result, console):
    """`minasgd bench step`: ours vs PyTorch per training step, a row pair per thread setting."""
    table = Table(title=f"training step: {result['model']}, batch {result['batch_size']}, "
                        f"{result['step_gflop']:.1f} GFLOP")
    for col, just in (("threads", "left"), ("implementation", "left"), ("ms / step", "right"),
                      ("images / s", "right"), ("GFLOP/s", "right"), ("of BLAS peak", "right"), ("CPU ms", "right"),
                      ("minasgd / PyTorch", "right"), ("in CPU time", "right")):
        table.add_column(col, justify=just)
    for row in result["rows"]:
        torch = "torch_seconds" in row
        peak = row.get("blas_peak_gflops")
        share = (lambda gflops: f"{gflops / peak:.0%}") if peak else (lambda gflops: "")
        table.add_row(row["threads"], f"minasgd {result['backend']} ({_our_threads_label(row)})",
                      f"{row['ours_seconds'] * 1e3:.1f}", f"{result['batch_size'] / row['ours_seconds']:.0f}",
                      f"{row['ours_gflops']:.0f}", share(row["ours_gflops"]), f"{row['ours_cpu_seconds'] * 1e3:.0f}",
                      f"[bold]{row['ratio_ours_over_torch']:.2f}x[/]" if torch else "",
                      f"{row['cpu_ratio_ours_over_torch']:.2f}x" if torch else "")
        if torch:
            table.add_row("", f"PyTorch {row['torch_device']} ({row['torch_threads']} threads)",
                          f"{row['torch_seconds'] * 1e3:.1f}", f"{result['batch_size'] / row['torch_seconds']:.0f}",
                          f"{row['torch_gflops']:.0f}", share(row["torch_gflops"]), f"{row['torch_cpu_seconds'] * 1e3:.0f}",
                          "", "")
    console.print(table)
    console.print(f"minasgd: {result['device']}", markup=False)
    if not any("torch_seconds" in row for row in result["rows"]):
        console.print("PyTorch not installed (pip install torch): no baseline in this run")
    else:
        console.print("minasgd / PyTorch: the time per step, above 1 means ours is slower (medians, same run); "
                      "CPU time counts every thread of the process")
    peaks = [f"{row['threads']}: {row['blas_peak_gflops']:.0f}" for row in result["rows"] if "blas_peak_gflops" in row]
    if peaks:
        console.print(f"BLAS peak, GFLOP/s of one 1536x1536 float32 product through NumPy ({', '.join(peaks)}): "
                      "the share above is each side's step against it")
    console.print(f"first step (includes compilation): {result['first_step_seconds'] * 1e3:.0f} ms")
    if result.get("scaling"):
        _show_step_scaling(result, console)


def _show_step_scaling(result, console):
    """The 1..N threads table of `bench step`: each side against its own best time."""
    torch = all("torch_seconds" in row for row in result["scaling"])
    table = Table(title=f"threads: 1..{result['cores']} (load average {result['load_before']:.1f} before, "
                        f"{result['load_after']:.1f} after)")
    for col in (("threads", "BLAS peak GFLOP/s", "minasgd ms / step", "vs its best", "of BLAS peak")
                + (("PyTorch ms / step", "vs its best", "of BLAS peak") if torch else ())):
        table.add_column(col, justify="right")
    for row in result["scaling"]:
        cells = [str(row["threads"]), f"{row['blas_peak_gflops']:.0f}", f"{row['ours_seconds'] * 1e3:.1f}",
                 f"{row['ours_over_best']:.2f}x", f"{row['ours_of_peak']:.0%}"]
        if torch:
            cells += [f"{row['torch_seconds'] * 1e3:.1f}", f"{row['torch_over_best']:.2f}x", f"{row['torch_of_peak']:.0%}"]
        table.add_row(*cells)
    console.print(table)
    if not torch:
        console.print("PyTorch baseline unavailable (not installed): the table shows our own scaling only")


def show_bench_kernels(result, console):
    """`minasgd bench kernels`: every kernel's time and rate, the tile sweep, the first call."""
    if "skipped" in result:
        console.print(result["skipped"], highlight=False, soft_wrap=True, markup=False)
        return
    table = Table(title=f"minasgd kernels on {result['device']}, alexnet-mini, batch {result['batch']}")
    for col, just in (("kernel", "left"), ("shape", "left"), ("ours ms", "right"), ("rate", "right"),
                      ("other version", "right"), ("ours faster by", "right"), ("torch ms", "right"), ("ours / torch", "right")):
        table.add_column(col, justify=just)
    for r in result["kernels"]:
        alt = f"{r['alt_version']} {r['alt_ms']:.3f} ms" if "alt_ms" in r else ""
        speedup = f"{r['speedup_vs_alt']:.1f}x" if "alt_ms" in r else ""
        torch_ms = f"{r['torch_ms']:.3f}" if "torch_ms" in r else ""
        ratio = f"{r['ours_over_torch']:.2f}" if "torch_ms" in r else ""
        table.add_row(r["kernel"], r["shape"], f"{r['ours_ms']:.3f}", f"{r['rate']:.1f} {r['unit']}",
                      alt, speedup, torch_ms, ratio)
    console.print(table)
    sweep = Table(title="tile size sweep (GFLOP/s)")
    sweep.add_column("tile", justify="right")
    names = [k for k in result["tile_sweep"][0] if k != "tile"]
    for name in names:
        sweep.add_column(name, justify="right")
    for row in result["tile_sweep"]:
        sweep.add_row(f"{row['tile']}x{row['tile']}", *(f"{row[n]['rate']:.1f}" for n in names))
    console.print(sweep)
    fc = result["first_call"]
    console.print(f"first call of {fc['kernel']}: {fc['first_call_s'] * 1e3:.1f} ms (JIT compile, or numba's on-disk "
                  f"cache) vs {fc['steady_s'] * 1e3:.3f} ms steady state")
    if not result["torch"]:
        console.print("PyTorch with CUDA not found: no cuDNN/cuBLAS comparison (pip install torch).")


# ---------------------------------------------------------------- experiments

class SweepView:
    """The live view of `minasgd experiment`: a bar over the runs and a line per run."""

    def __init__(self, console):
        self.console = console
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bars = Progress(*columns, console=console, transient=False)
        self.bar = None

    def __call__(self, event):
        kind, say = event["kind"], self.bars.console.print
        if kind == "sweep_start":
            s = event["settings"]
            self.console.print(f"[bold]experiment {s.name}[/]: {event['runs']} runs of {s.model} on {s.dataset} "
                               f"({s.backend}), {s.epochs} epochs each, target test accuracy {s.target:.0%} "
                               f"(test error {1 - s.target:.0%}) -> {event['exp_dir']}")
            self.bars.start()
            self.bar = self.bars.add_task("runs", total=event["runs"])
        elif kind == "run_skipped":
            say(f"  {event['name']}: done before, skipped", style="dim")
        elif kind == "run_start":
            self.bars.update(self.bar, description=f"run {event['name']}")
        elif kind == "run_failed":
            say(f"  [red]{event['name']} failed: {event['error']}[/]")
        elif kind == "run_done":
            hit, s = event["hit"], event["summary"]
            reached = f"target at {hit['time']:.1f} s / {hit['images']:.0f} images" if hit else "target not reached"
            say(f"  {event['name']}: test accuracy {s['test_accuracy']:.1%}, {reached}, "
                f"{s['images_per_second']:.0f} images/s, {event['seconds']:.0f} s")
        elif kind == "run_end":
            self.bars.advance(self.bar)
        elif kind == "sweep_end":
            self.bars.update(self.bar, description="runs")
            self.bars.stop()
        elif kind == "no_plots":
            self.console.print("[yellow]matplotlib is not installed: tables only, no plots "
                               "(pip install -e \".[plot]\")[/]")


def experiment_table(result, summary_columns, summary_cells):
    """The summary table of a sweep (`minasgd.experiments.report` gives the columns and cells)."""
    s = result["settings"]
    table = Table(title=f"{result['experiment']}: target test error {1 - s['target']:.0%} "
                        f"(mean ± std over seeds; ≥: runs that missed the target count with their whole length)")
    for _, short, _ in summary_columns:
        table.add_column(short, justify="left" if short in ("group", "mode") else "right")
    for row in summary_cells(result["summary"]):
        table.add_row(*row)
    return table


SHORT_LIMIT = {"blocks": "blocks", "warps": "warps", "registers": "regs", "smem": "smem"}


def show_kernel_static(result, console):
    """`minasgd bench kernels --static`: registers, shared memory, spills and occupancy per kernel."""
    if "skipped" in result:
        console.print(result["skipped"], highlight=False, soft_wrap=True, markup=False)
        return
    archs = result["archs"]
    table = Table(title="minasgd kernels as the hardware sees them (compiled offline, no GPU needed)")
    for col in ("kernel", "version", "threads"):
        table.add_column(col, justify="right" if col == "threads" else "left", overflow="fold")
    for arch in archs:
        table.add_column(f"regs {arch}", justify="right")
    for col in ("smem", "spills", "f64"):
        table.add_column(col, justify="right")
    for arch in archs:
        table.add_column(f"occupancy {arch}", justify="right")
    for row in result["kernels"]:
        per = [row["archs"][a] for a in archs]
        if any("error" in p for p in per):
            table.add_row(row["kernel"], row["version"], str(row["threads"]),
                          *["[red]error[/]"] * (2 * len(archs) + 3))
            continue
        spills = max(p["spill_stores"] + p["spill_loads"] for p in per)
        f64 = max(p["f64"] for p in per)
        table.add_row(
            row["kernel"], row["version"], str(row["threads"]),
            *(str(p["registers"]) for p in per),
            f"{per[0]['smem'] / 1024:.1f} KB" if per[0]["smem"] else "0",
            f"[red]{spills} B[/]" if spills else "0",
            f"[red]{f64}[/]" if f64 else "0",
            *(f"{p['occupancy']:.0%} {SHORT_LIMIT[p['limit']]}" for p in per))
    console.print(table)
    console.print("occupancy: resident warps per SM / the maximum 64, limited by: blocks (32 blocks per SM), "
                  "warps (64 per SM), regs (the 65,536-register file) or smem (shared memory). See docs/gpu.md.")
    for row in result["kernels"]:
        for arch, p in row["archs"].items():
            if "error" in p:
                console.print(f"[red]{row['kernel']} on {arch}: {escape(p['error'])}[/]")
def show_kernel_profile(result, console):
    """`minasgd bench kernels --simulated`: the modelled memory profile of every kernel (kernels/memprofile.py)."""
    if "skipped" in result:
        console.print(result["skipped"], highlight=False, soft_wrap=True, markup=False)
        return
    from ..kernels import memprofile

    table = Table(title=f"minasgd kernels' memory traffic, MODELLED on the CUDA simulator "
                        f"(Model(\"{result['model']}\"), batch {result['batch']}; not measured)")
    for i, col in enumerate(memprofile.COLUMNS):
        table.add_column(col, justify="left" if i < 3 else "right", overflow="fold")
    for row in result["kernels"]:
        table.add_row(*(Text(cell) for cell in memprofile.table_cells(row)))
    console.print(table)
    console.print(memprofile.caption(result["gpu"]), highlight=False, markup=False)
