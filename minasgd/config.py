"""What a training run is asked to do (`TrainConfig`) and how many steps that makes.

A small module of its own, so the command line can build its parser from the defaults here
without importing the trainer, and the single-process trainer and the parameter server count
their steps the same way (`total_steps`).
"""

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    dataset: str = "shapes"
    model: str = "alexnet-mini"
    backend: str = "auto"
    gpu: int | None = None
    epochs: int = 6
    batch_size: int = 64
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    seed: int = 0
    init: str | None = None
    out: str | None = None
    data_root: str | None = None
    max_steps: int | None = None  # stop early, with the schedule shortened to match (tests, quick looks)
    # A warm start that keeps its schedule (the paper's): begin at the --init checkpoint's step
    # count in this run's warm-up + cosine, instead of at step 0 of a fresh schedule.
    continue_schedule: bool = False
    stop_step: int | None = None  # stop at this step WITHOUT shortening the schedule (a mid-run snapshot)
    train_limit: int | None = None  # use only the first images of each split (tests, quick looks)
    test_limit: int | None = None
    log_every: int = 20
    eval_every: float = 1.0  # epochs between test evaluations (a fraction: at exact step counts)
    eval_train: int = 0  # also evaluate the first N training images at each evaluation (training error, as the paper plots)
    threads: int | None = None  # one process: BLAS and loop threads (None: the idle cores, `minasgd.threads`)
    quiet: bool = False  # no live display (read by the command line and the parameter server's monitor)
    extra: dict = field(default_factory=dict)


def step_range(cfg, schedule_steps, start_step=0):
    """(first step, step to stop at) of a run whose lr schedule spans `schedule_steps`: from
    `start_step` (a continued schedule) to the end, or to `cfg.stop_step`. ValueError if empty."""
    last = min(schedule_steps, cfg.stop_step) if cfg.stop_step else schedule_steps
    if not 0 <= start_step < last:
        raise ValueError(f"nothing to train: the run would go from step {start_step} to step {last} "
                         f"(of a {schedule_steps}-step schedule)")
    return start_step, last


def total_steps(cfg, train_size):
    """(steps per epoch, total steps) for `train_size` images: whole batches only, capped by max_steps."""
    steps_per_epoch = train_size // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {cfg.batch_size} is larger than the training set ({train_size} images)")
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    return steps_per_epoch, total
