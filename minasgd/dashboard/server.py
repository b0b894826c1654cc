"""The parameter server on a terminal: its live dashboard, its run's lines, the `bench ps` tables."""

import math
import time

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text


class ServerDashboard:
    """The live view of a parameter server: its numbers, one row per worker, the last events.

    `render()` draws one frame from `monitor` (a `minasgd.ps.monitor.Monitor`: the server's
    `stats()`, its evaluations and recent events). Everything a peer can choose (worker names, the
    reasons they left) goes in as Text: plain, never rich markup.
    """

    def __init__(self, monitor):
        self.monitor = monitor

    def render(self):
        monitor = self.monitor
        s = monitor.ps.stats()
        head = Text.assemble(
            ("server ", "bold"), f"{monitor.address}  {s['mode']}, {s['optimizer']}   ",
            ("version ", "bold"), f"{s['version']}   ", ("step ", "bold"),
            f"{s['steps']}/{s['total_steps']} ({s['steps'] / max(1, s['total_steps']):.0%})   ",
            ("lr ", "bold"), f"{s['lr']:.4g}   ", ("rejected ", "bold"), f"{s['rejected']}   ",
            f"{monitor.elapsed():.0f} s")
        table = Table(expand=False, box=None, header_style="bold")
        for col in ("worker", "status", "images/s", "pushes", "fetches", "staleness", "loss"):
            table.add_column(col, justify="left" if col in ("worker", "status") else "right")
        for w in s["workers"]:
            status = Text("training", style="green") if w["alive"] else Text(str(w["left"]), style="yellow")
            if w["alive"] and w.get("missed_rounds"):
                status.append(f", missed {w['missed_rounds']} sync round(s)", style="yellow")
            table.add_row(Text(f"{w['id']} {w['name']}"), status, f"{w.get('images_per_second', 0):.0f}",
                          str(w["pushes"]), str(w["fetches"]), str(w["last_staleness"]),
                          f"{w.get('loss', math.nan):.3f}")
        staleness = "  ".join(f"{k}: {v}" for k, v in s["staleness"].items()) or "-"
        accuracy = "  ".join(f"{e['test_accuracy']:.1%} @ {e['time']:.0f}s" for e in monitor.evals[-6:]) or "-"
        lines = [head, table, Text(f"staleness (pushes): {staleness}"), Text(f"test accuracy: {accuracy}")]
        if s["departed_unlisted"]:
            lines.append(Text(f"(and {s['departed_unlisted']} more workers that left)", style="dim"))
        if s["checkpoint_error"]:
            lines.append(Text(f"warning: {s['checkpoint_error']}", style="bold red"))
        lines += [Text(f"{time.strftime('%H:%M:%S', time.localtime(t))} {text}", style="dim")
                  for t, text in monitor.ps.recent_events(3)]
        return Panel(Group(*lines), title="minasgd parameter server", expand=False)


def staleness_summary(histogram):
    """'mean 1.2, max 4' from {"0": n0, "1": n1, ...}."""
    total = sum(histogram.values())
    if not total:
        return "-"
    mean = sum(int(k) * v for k, v in histogram.items()) / total
    return f"mean {mean:.2f}, max {max(int(k) for k in histogram)}"


class ServerView:
    """The `on_event` callback of `minasgd train --workers N`, `serve` and rank 0 of an MPI job:
    a line per event, and `ServerDashboard` live between "serving" and "served" (nothing when quiet)."""

    def __init__(self, console=None, quiet=False):
        self.console = console or Console()
        self.quiet = quiet
        self.live = None

    def say(self, text):
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False)

    def __call__(self, event):
        kind = event["kind"]
        if kind == "say":
            self.say(event["text"])
        elif kind == "warm_start":
            self.say(f"warm start from {event['init']} ({event['steps']} steps trained)")
        elif kind == "server_start":
            e = event
            self.say(f"parameter server on {e['address']} ({e['mode']}, {e['optimizer']}, nsync {e['nsync']}); "
                     f"{e['workers']}; {e['rule']}; model {e['model']}: {e['num_params']:,} parameters; "
                     f"dataset {e['dataset']}: {e['train_images']:,} train / {e['test_images']:,} test; "
                     f"run dir {e['run_dir']}")
        elif kind == "resumed":
            self.say(f"resumed from {event['path']}: version {event['version']}, "
                     f"step {event['steps']}/{event['total_steps']}")
        elif kind == "serving" and not self.quiet:
            self.live = Live(get_renderable=ServerDashboard(event["monitor"]).render, console=self.console,
                             refresh_per_second=2)
            self.live.__enter__()
        elif kind == "served" and self.live is not None:
            live, self.live = self.live, None
            live.__exit__(None, None, None)
            if not live.console.is_terminal:
                live.console.line()  # a log file gets the last frame; end its line
        elif kind == "warning":  # said even when quiet
            self.console.print(f"warning: {event['text']}", markup=False, highlight=False, soft_wrap=True)
        elif kind == "stopped":  # said even when quiet: where the run can be resumed from
            why = f"stopped by {event['signal']}" if event["signal"] else "stopped before training was over"
            if event["checkpoint"]:
                self.console.print(f"{why} at step {event['steps']}/{event['total_steps']} (version {event['version']}): "
                                   f"checkpoint {event['checkpoint']}; continue with --resume {event['run_dir']}",
                                   markup=False, highlight=False, soft_wrap=True)
            else:
                self.console.print(f"{why} at step {event['steps']}/{event['total_steps']}: no checkpoint written "
                                   f"({event['error'] or 'none configured'})", markup=False, highlight=False,
                                   soft_wrap=True)
        elif kind == "done":
            n = event["summary"]
            self.say(f"done: test accuracy {n['test_accuracy']:.2%}, {n['wall_seconds']:.0f} s, "
                     f"{n['images_per_second']:.0f} images/s, {n['pushes']} pushes, "
                     f"staleness {staleness_summary(n['staleness'])} -> {event['run_dir']}")


def show_bench_ps(result, console):
    """`minasgd bench ps`: goodput per vector size (ours vs raw, and MPI), server work, the speed-up."""
    for size in result["sizes"]:
        table = Table(title=f"parameter server goodput: {result['model']} x{size['times']}, "
                            f"{size['num_params']:,} float32 ({size['megabytes']:.1f} MB), loopback, "
                            f"medians of {result['rounds']}")
        with_mpi = "mpi" in next(iter(size["goodput"].values()))
        columns = ["operation", "ours round trips/s", "ours MB/s", "raw socket MB/s", "ours / raw"]
        if with_mpi:
            columns += ["MPI round trips/s", "MPI MB/s", "raw MPI MB/s", "MPI / raw MPI", "MPI / socket"]
        for col in columns:
            table.add_column(col, justify="left" if col == "operation" else "right")
        for op, r in size["goodput"].items():
            row = [op, f"{r['ours']:.0f}", f"{r['ours_mb_per_second']:.0f}", f"{r['raw_mb_per_second']:.0f}",
                   f"{r['ratio']:.0%}"]
            if with_mpi:
                row += [f"{r['mpi']:.0f}", f"{r['mpi_mb_per_second']:.0f}", f"{r['raw_mpi_mb_per_second']:.0f}",
                        f"{r['mpi_vs_raw_mpi']:.0%}", f"{r['mpi_vs_socket']:.2f}x"]
            table.add_row(*row)
        console.print(table)
    if "mpi_library" in result:
        console.print(f"MPI: {result['mpi_library']}; ours = the minasgd transport (socket: TcpServer, MPI: "
                      f"MpiServer), both with the same ParameterServer behind it", highlight=False)
    console.print(f"server work per push (the default run's server: finite check + w -= lr * push, no network): "
                  f"{result['server_seconds_per_push'] * 1e3:.2f} ms")
    if "speedup" not in result:
        return
    table = Table(title="workers on shapes (workers 0 = single process)")
    for col in ("workers", "images/s", "test accuracy", "time to target", "pushes", "mean staleness"):
        table.add_column(col, justify="right")
    for row in result["speedup"]:
        hist = row["staleness"] or {}
        total = sum(hist.values())
        mean = sum(int(k) * v for k, v in hist.items()) / total if total else None
        table.add_row(str(row["workers"]), f"{row['images_per_second']:.0f}", f"{row['test_accuracy']:.1%}",
                      "-" if row["seconds_to_target"] is None else f"{row['seconds_to_target']:.0f} s",
                      str(row["pushes"] or "-"), "-" if mean is None else f"{mean:.2f}")
    console.print(table)


def show_bench_ps_hostile(result, console):
    """`minasgd bench ps --hostile`: the workers' rate undisturbed and under attack."""
    console.print(
        f"parameter server under attack: {result['workers']} workers doing push+fetch of {result['model']} "
        f"({result['num_params']:,} float32) on loopback, {result['rounds']} x {result['seconds']:g} s each way, "
        f"alternating\n"
        f"  undisturbed   {result['rate_undisturbed']:.0f} round trips/s\n"
        f"  under attack  {result['rate_under_attack']:.0f} round trips/s: {result['held']} idle connections held "
        f"({result['refused_at_connect']} refused), {result['malformed_answered']}/{result['malformed_sent']} "
        f"malformed frames answered with ERROR (a truncated one is just hung up on)\n"
        f"  ratio         {result['ratio']:.0%} of the undisturbed rate (goal: >= 90%)", highlight=False)
