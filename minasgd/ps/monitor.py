"""Watching a parameter server while it trains: test accuracy, metrics, checkpoints, a live dashboard.

    monitor = Monitor(ps, run, eval_model, ds.test_x, ds.test_y, steps_per_epoch, batch_size)
    with monitor:                 # the rich dashboard (unless quiet)
        while not ps.done:
            monitor.tick()        # evaluate / log / checkpoint when due
            time.sleep(0.2)
    monitor.finish()              # final evaluation; returns the summary's numbers

Used by `minasgd train --workers N` (`minasgd.ps.launcher`) and `minasgd serve`. It only reads
the server (`ps.stats()`, `ps.snapshot()`), so it never slows a push down beyond a copy.

metrics.jsonl gets the same record kinds as single-process training, with the server's clock:
"step" (every `log_every` seconds: mean worker loss, images/s, version, lr) and "epoch" (every
`eval_every` epochs' worth of mini-batches: test accuracy and loss), plus "server" records with
the staleness histogram and per-worker numbers next to each "epoch" record.
"""

import math
import time

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..train import evaluate


class Monitor:
    def __init__(self, ps, run, eval_model, test_x, test_y, steps_per_epoch, batch_size, *,
                 address="", console=None, quiet=False, eval_every=1.0, log_every=2.0):
        self.ps, self.run = ps, run
        self.eval_model, self.test_x, self.test_y = eval_model, test_x, test_y
        self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
        self.address, self.console, self.quiet = address, console, quiet
        self.eval_steps = max(1, round(eval_every * steps_per_epoch))
        self.log_every = log_every
        self.next_eval, self.next_log = self.eval_steps, time.monotonic() + log_every
        self.evals = []  # the "epoch" records, in order
        self.live = None

    # ------------------------------------------------------------------ the loop's body

    def elapsed(self):
        """Seconds since training started (all expected workers joined); 0 before."""
        return 0.0 if self.ps.ready_time is None else time.perf_counter() - self.ps.ready_time

    def tick(self):
        """Evaluate, log and checkpoint if due. Cheap when nothing is."""
        if self.ps.steps >= self.next_eval:
            self.evaluate()
        if time.monotonic() >= self.next_log:
            self.log_step()
            self.next_log = time.monotonic() + self.log_every
        failures = self.ps.checkpoint_failures
        self.ps.maybe_checkpoint()
        if self.ps.checkpoint_failures > failures:  # warned on the dashboard; logged here
            self.run.log({"kind": "warning", "step": self.ps.steps, "time": self.elapsed(),
                          "warning": self.ps.checkpoint_error})

    def evaluate(self):
        """Test accuracy of the server's current parameters; logs an "epoch" and a "server" record."""
        params, version, steps = self.ps.snapshot()
        self.eval_model.set_params(params)
        accuracy, loss = evaluate(self.eval_model, self.test_x, self.test_y)
        seconds = self.elapsed()
        record = {"kind": "epoch", "epoch": steps / self.steps_per_epoch, "step": steps, "version": version,
                  "test_accuracy": accuracy, "test_loss": loss, "images": steps * self.batch_size,
                  "images_per_second": steps * self.batch_size / max(seconds, 1e-9), "time": seconds}
        self.evals.append(record)
        self.run.log(record)
        stats = self.ps.stats()
        self.run.log({"kind": "server", "step": steps, "version": version, "time": seconds,
                      **{k: stats[k] for k in ("pushes", "fetches", "rejected", "staleness", "workers")}})
        self.next_eval = (steps // self.eval_steps + 1) * self.eval_steps
        return record

    def log_step(self):
        stats = self.ps.stats()
        losses = [w["loss"] for w in stats["workers"] if w["alive"] and math.isfinite(w.get("loss", math.nan))]
        seconds = self.elapsed()
        images = stats["steps"] * self.batch_size
        self.run.log({"kind": "step", "step": stats["steps"], "version": stats["version"],
                      "epoch": stats["steps"] / self.steps_per_epoch, "lr": stats["lr"],
                      "loss": sum(losses) / len(losses) if losses else None, "images": images,
                      "images_per_second": images / max(seconds, 1e-9), "time": seconds})

    def finish(self):
        """A last evaluation (unless one was just made); returns the numbers for summary.json."""
        if not self.evals or self.evals[-1]["step"] != self.ps.steps:
            self.evaluate()
        last = self.evals[-1]
        stats = self.ps.stats()
        seconds = self.elapsed()
        return {"test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
                "epochs": stats["steps"] / self.steps_per_epoch, "steps": stats["steps"],
                "images": stats["steps"] * self.batch_size, "wall_seconds": seconds, "train_seconds": seconds,
                "images_per_second": stats["steps"] * self.batch_size / max(seconds, 1e-9),
                "version": stats["version"], "pushes": stats["pushes"], "fetches": stats["fetches"],
                "rejected": stats["rejected"], "discarded": stats["discarded"], "staleness": stats["staleness"],
                "checkpoint_failures": stats["checkpoint_failures"],
                "mode": stats["mode"], "optimizer": stats["optimizer"], "worker_stats": stats["workers"],
                "evaluations": [{k: e[k] for k in ("step", "time", "test_accuracy")} for e in self.evals]}

    # ------------------------------------------------------------------ the dashboard

    def __enter__(self):
        if not self.quiet:
            self.live = Live(get_renderable=self.render, console=self.console, refresh_per_second=2)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)
            if not self.live.console.is_terminal:
                self.live.console.line()  # a log file gets the last frame; end its line
        return False

    def render(self):
        s = self.ps.stats()
        head = Text.assemble(
            ("server ", "bold"), f"{self.address}  {s['mode']}, {s['optimizer']}   ",
            ("version ", "bold"), f"{s['version']}   ", ("step ", "bold"),
            f"{s['steps']}/{s['total_steps']} ({s['steps'] / max(1, s['total_steps']):.0%})   ",
            ("lr ", "bold"), f"{s['lr']:.4g}   ", ("rejected ", "bold"), f"{s['rejected']}   ",
            f"{self.elapsed():.0f} s")
        # Everything a peer can choose (names, reasons) goes in as Text: plain, never rich markup.
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
        accuracy = "  ".join(f"{e['test_accuracy']:.1%} @ {e['time']:.0f}s" for e in self.evals[-6:]) or "-"
        lines = [head, table, Text(f"staleness (pushes): {staleness}"), Text(f"test accuracy: {accuracy}")]
        if s["departed_unlisted"]:
            lines.append(Text(f"(and {s['departed_unlisted']} more workers that left)", style="dim"))
        if s["checkpoint_error"]:
            lines.append(Text(f"warning: {s['checkpoint_error']}", style="bold red"))
        lines += [Text(f"{time.strftime('%H:%M:%S', time.localtime(t))} {text}", style="dim")
                  for t, text in self.ps.recent_events(3)]
        return Panel(Group(*lines), title="minasgd parameter server", expand=False)
