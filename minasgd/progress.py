"""The live view of a training run (rich): a bar per epoch with loss and images/s, a line per epoch."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, quiet=False, console=None):
        self.quiet = quiet
        self.console = console or Console()
        self.bars = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
            TimeRemainingColumn(), console=self.console, disable=quiet, transient=False,
        )

    def say(self, text):
        if not self.quiet:
            self.console.print(text)

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)

    def start_epoch(self, epoch, epochs, steps):
        return self.bars.add_task("", total=steps, epoch=f"{epoch}/{epochs}", loss=float("nan"), ips=0.0)

    def update(self, bar, completed, loss, ips):
        self.bars.update(bar, completed=completed, loss=loss, ips=ips)

    def end_epoch(self, bar, record):
        self.bars.update(bar, completed=self.bars.tasks[bar].total)
        self.say(f"  epoch {record['epoch']}: test accuracy {record['test_accuracy']:.2%}, "
                 f"test loss {record['test_loss']:.3f}, {record['images_per_second']:.0f} img/s")
