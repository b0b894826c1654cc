"""Watching a parameter server while it trains: test accuracy, metrics, checkpoints.

    monitor = Monitor(ps, run, eval_model, ds.test_x, ds.test_y, steps_per_epoch, batch_size,
                      on_event=view)
    with monitor:                 # tells on_event "serving" / "served" (a live dashboard, if any)
        while not ps.done:
            monitor.tick()        # evaluate / log / checkpoint when due
            time.sleep(0.2)
    monitor.finish()              # final evaluation; returns the summary's numbers

Used by `minasgd train --workers N` (`minasgd.ps.launcher`) and `minasgd serve`. It only reads
the server (`ps.stats()`, `ps.snapshot()`), so it never slows a push down beyond a copy. It draws
nothing: the live dashboard is `minasgd.dashboard.ServerDashboard`, which reads the same numbers.

metrics.jsonl gets the same record kinds as single-process training, with the server's clock:
"step" (every `log_every` seconds: mean worker loss, images/s, version, lr) and "epoch" (every
`eval_every` epochs' worth of mini-batches: test accuracy and loss of the copy of the parameters
the server set aside at the first update that reached that step count, so evaluations land at
exact step counts however late the monitor looks), plus "server" records with
the staleness histogram and per-worker numbers next to each "epoch" record. A record the disk
refuses (full, read-only) is a warning in the server's events, not the end of the run.
"""

import math
import time

from ..train import evaluate_record


def _ignore(event):
    pass


class Monitor:
    def __init__(self, ps, run, eval_model, test_x, test_y, steps_per_epoch, batch_size, *,
                 address="", on_event=None, eval_every=1.0, log_every=2.0, train_sample=None):
        self.ps, self.run = ps, run
        self.eval_model, self.test_x, self.test_y = eval_model, test_x, test_y
        self.train_sample = train_sample  # (x, y): training accuracy at each evaluation too (`minasgd.train.train_sample`)
        self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
        self.address = address  # what the dashboard calls this server
        self.on_event = on_event or _ignore
        self.eval_steps = max(1, round(eval_every * steps_per_epoch))
        self.log_every = log_every
        self.next_eval, self.next_log = self.eval_steps, time.monotonic() + log_every
        self.evals = []  # the "epoch" records, in order
        self.log_warned = False  # metrics.jsonl is failing and the server's events say so

    # ------------------------------------------------------------------ the loop's body

    def elapsed(self):
        """Seconds since training started (all expected workers joined); 0 before."""
        return 0.0 if self.ps.ready_time is None else time.perf_counter() - self.ps.ready_time

    def tick(self):
        """Evaluate, log and checkpoint if due. Cheap when nothing is."""
        while (snapshot := self.ps.take_eval_snapshot()) is not None:
            self.evaluate(snapshot)
        if self.ps.eval_every_steps is None and self.ps.steps >= self.next_eval:
            self.evaluate()
        if time.monotonic() >= self.next_log:
            self.log_step()
            self.next_log = time.monotonic() + self.log_every
        failures = self.ps.checkpoint_failures
        self.ps.maybe_checkpoint()
        if self.ps.checkpoint_failures > failures:  # warned on the dashboard (ps.stats()); logged here
            self.log({"kind": "warning", "step": self.ps.steps, "time": self.elapsed(),
                      "warning": self.ps.checkpoint_error})

    def log(self, record):
        """Append `record` to metrics.jsonl; if the disk refuses it, say so once in the server's
        events (the dashboard shows them) and go on, and say when it works again."""
        if self.run.log(record) is False:
            if not self.log_warned:
                self.log_warned = True
                self.ps.log(f"{self.run.log_error}; training goes on, metrics are lost until it works again")
        elif self.log_warned:
            self.log_warned = False
            self.ps.log("metrics.jsonl is written again")

    def evaluate(self, snapshot=None):
        """Test accuracy of `snapshot` (params, version, steps), by default the server's parameters
        now; logs an "epoch" and a "server" record."""
        params, version, steps = snapshot or self.ps.snapshot()
        self.eval_model.set_params(params)
        accuracies = evaluate_record(self.eval_model, (self.test_x, self.test_y), self.train_sample)
        seconds = self.elapsed()
        images = (steps - self.ps.start_step) * self.batch_size  # this run's (a continued schedule starts late)
        record = {"kind": "epoch", "epoch": steps / self.steps_per_epoch, "step": steps, "version": version,
                  **accuracies, "images": images,
                  "images_per_second": images / max(seconds, 1e-9), "time": seconds}
        self.evals.append(record)
        self.log(record)
        stats = self.ps.stats()
        self.log({"kind": "server", "step": steps, "version": version, "time": seconds,
                      **{k: stats[k] for k in ("pushes", "fetches", "rejected", "staleness", "workers")}})
        self.next_eval = (steps // self.eval_steps + 1) * self.eval_steps
        return record

    def log_step(self):
        stats = self.ps.stats()
        losses = [w["loss"] for w in stats["workers"] if w["alive"] and math.isfinite(w.get("loss", math.nan))]
        seconds = self.elapsed()
        images = (stats["steps"] - self.ps.start_step) * self.batch_size
        self.log({"kind": "step", "step": stats["steps"], "version": stats["version"],
                      "epoch": stats["steps"] / self.steps_per_epoch, "lr": stats["lr"],
                      "loss": sum(losses) / len(losses) if losses else None, "images": images,
                      "images_per_second": images / max(seconds, 1e-9), "time": seconds})

    def finish(self):
        """A last evaluation (unless one was just made); returns the numbers for summary.json."""
        while (snapshot := self.ps.take_eval_snapshot()) is not None:
            self.evaluate(snapshot)
        if not self.evals or self.evals[-1]["step"] != self.ps.steps:
            self.evaluate()
        last = self.evals[-1]
        stats = self.ps.stats()
        seconds = self.elapsed()
        images = (stats["steps"] - self.ps.start_step) * self.batch_size  # this run's
        return {"test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
                "epochs": stats["steps"] / self.steps_per_epoch, "steps": stats["steps"],
                "images": images, "wall_seconds": seconds, "train_seconds": seconds,
                "images_per_second": images / max(seconds, 1e-9),
                "version": stats["version"], "pushes": stats["pushes"], "fetches": stats["fetches"],
                "rejected": stats["rejected"], "discarded": stats["discarded"], "staleness": stats["staleness"],
                "checkpoint_failures": stats["checkpoint_failures"],
                "mode": stats["mode"], "optimizer": stats["optimizer"], "worker_stats": stats["workers"],
                "evaluations": [{k: e[k] for k in ("step", "time", "test_accuracy")} for e in self.evals]}

    # ------------------------------------------------------------------ the view's hook

    def __enter__(self):
        """Tell `on_event` the server is being watched: {"kind": "serving", "monitor": self}
        (`minasgd.dashboard.ServerView` starts its live dashboard of this monitor then)."""
        self.on_event({"kind": "serving", "monitor": self})
        return self

    def __exit__(self, *exc):
        self.on_event({"kind": "served"})
        return False
