"""The library runs with no terminal: training and the datasets report through callbacks and
events, and only the dashboard (the command line's) turns them into text."""

import io

from rich.console import Console

from minasgd.config import TrainConfig
from minasgd.dashboard import TaskBars, TrainProgress
from minasgd.data import shapes
from minasgd.train import train


def test_training_reports_events_and_prints_nothing(tmp_path, capsys):
    events = []
    cfg = TrainConfig(dataset="shapes:48,16", model="micro", backend="numpy", epochs=2, batch_size=16,
                      out=str(tmp_path / "run"), data_root=str(tmp_path), log_every=1, warmup_steps=0)
    summary = train(cfg, on_event=events.append)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "backend" and "progress" in kinds and kinds[-1] == "done"
    assert kinds.count("epoch_start") == 2 and kinds.count("epoch") == 2 and kinds.count("step") == 6
    assert [e["batch"] for e in events if e["kind"] == "step"] == [1, 2, 3, 1, 2, 3]
    assert events[-1]["summary"] == summary

    text = io.StringIO()
    with TrainProgress(console=Console(file=text, width=120)) as view:
        for event in events:
            view(event)
    shown = text.getvalue()
    assert "backend: numpy" in shown and "epoch 2: test accuracy" in shown and "done: test accuracy" in shown


def test_datasets_report_progress_through_a_callback(tmp_path, capsys):
    heard = []
    shapes.make(seed=0, train_size=30, test_size=10, progress=lambda what, done, total: heard.append((what, done, total)))
    assert heard[0] == ("drawing shapes", 0, 40) and heard[-1] == ("drawing shapes", 40, 40)
    assert capsys.readouterr().out == ""
    with TaskBars(Console(file=io.StringIO())) as bars:  # the command line's bars take the same callback
        shapes.make(seed=0, train_size=30, test_size=10, progress=bars)
