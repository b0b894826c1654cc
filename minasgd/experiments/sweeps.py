"""The four sweeps: which runs each experiment makes, and with which settings.

A sweep is a plain list of run specs (dicts), executed one after the other by
`minasgd.experiments.runner`. Each spec names its run folder and says everything that differs
between runs: the worker count, nsync, async or sync, the lr scaling, the seed, and whether
it starts from scratch ("cold") or from a pretrained model ("warm"). Every sweep also runs the
single-process trainer with the same settings and seeds (group "single", or "single-warm" from
the pretrained model): the baseline that asynchronous training has to beat.

    settings = default_settings("workers")        # plus command-line overrides
    specs = plan(settings)                        # [{"name": "cold-ns4-w2-s0", ...}, ...]

The defaults are sized for a 2-core laptop (the tiny model on 8,000 shapes images: each run
takes 15-25 s); `--quick` shrinks everything to seconds for the tests; `--dataset cifar10
--backend cuda --model alexnet-mini --epochs 20` scales up on a GPU machine.
"""

from dataclasses import asdict, dataclass, field

NAMES = ("workers", "warmstart", "sync-vs-async", "staleness")


@dataclass
class Settings:
    """One experiment's settings (everything that is the same for all its runs)."""

    name: str
    dataset: str = "shapes:8000,500"
    model: str = "tiny"
    backend: str = "numpy"
    gpu: int | None = None
    epochs: int = 8  # of the whole train split, summed over all workers
    batch_size: int = 32
    lr: float = 0.02  # peak lr (warm-up + cosine over the run's mini-batches), as `minasgd train`
    momentum: float = 0.9  # the trainer's and every worker's SGD momentum
    # For runs that don't sweep it. "none" (the sum of the pushes, each worker's momentum lowered
    # by `--momentum-scaling staleness`): the settings the committed sweeps in docs/results/sweeps
    # were run with, before `minasgd train` made the averaging server its default. `--lr-scaling
    # average` reruns a sweep with it (the runner then also keeps each worker's momentum as given).
    lr_scaling: str = "none"
    warmup_steps: int = 100
    target: float = 0.3  # test ACCURACY that counts as "reached" (the paper talks of test error = 1 - this)
    seeds: int = 3
    workers: list = field(default_factory=lambda: [1, 2, 4, 8])
    nsync: list = field(default_factory=lambda: [1, 4, 16, 300])  # the paper used nsync >= 300
    eval_every: float = 0.25  # epochs' worth of mini-batches between test evaluations
    eval_train: int = 500  # training images evaluated too (training error, as the paper plots)
    pretrain_epochs: float = 3.0  # warmstart: the first epochs of the run's schedule in one process
    data_root: str | None = None
    max_steps: int | None = None  # cap every run (quick mode)
    quick: bool = False

    def as_dict(self):
        return asdict(self)


# What differs from the Settings defaults, per experiment.
DEFAULTS = {
    "workers": {},
    # From a snapshot 3 of 8 epochs into the schedule, which the warm runs continue (the paper's
    # warm start); the target is meant to lie well above the snapshot's accuracy.
    "warmstart": {"workers": [1, 2, 4], "nsync": [1, 4, 16, 300], "target": 0.4},
    "sync-vs-async": {"workers": [1, 2, 4], "nsync": [4]},  # the same per-image step (sync sums a round)
    "staleness": {"workers": [4, 8], "nsync": [1]},
}

# --quick: seconds per run, for the tests and a first look. The `micro` net reads an 8x8 crop.
QUICK = {"dataset": "shapes:256,64", "model": "micro", "epochs": 2, "batch_size": 16, "seeds": 1,
         "warmup_steps": 0, "eval_every": 0.5, "target": 0.12, "pretrain_epochs": 0.5, "lr": 0.02}
QUICK_SWEEP = {"workers": {"workers": [1, 2], "nsync": [1, 4]}, "warmstart": {"workers": [1, 2], "nsync": [2]},
               "sync-vs-async": {"workers": [1, 2], "nsync": [2]}, "staleness": {"workers": [2], "nsync": [1]}}


def default_settings(name, quick=False):
    if name not in NAMES:
        raise ValueError(f"unknown experiment {name!r}; choose one of: {', '.join(NAMES)}")
    values = dict(DEFAULTS[name])
    if quick:
        values.update(QUICK, **QUICK_SWEEP[name], quick=True)
    return Settings(name=name, **values)


def _spec(group, workers, nsync, seed, lr_scaling="none", **extra):
    mode = "sync" if extra.get("sync") else "async"
    return {"name": f"{group}-ns{nsync}-w{workers}-s{seed}", "group": group, "workers": workers, "nsync": nsync,
            "mode": mode, "sync": False, "lr_scaling": lr_scaling, "seed": seed, "init": None, **extra}


def _one_process(group, seed, mode="single", init=None):
    """A single-process run: the baseline ("single"), or warm start's pretraining ("pretrain")."""
    return {"name": f"{group}-s{seed}", "group": group, "workers": 0, "nsync": 0, "mode": mode, "sync": False,
            "lr_scaling": "none", "seed": seed, "init": init}


def plan(s):
    """The runs of experiment `s.name`, in the order they run (pretraining and baselines first)."""
    seeds = range(s.seeds)
    scaling = s.lr_scaling
    single = [_one_process("single", seed) for seed in seeds]
    if s.name == "workers":
        return single + [_spec("cold", w, k, seed, scaling) for seed in seeds for k in s.nsync for w in s.workers]
    if s.name == "warmstart":
        pre = [_one_process("pretrain", seed, mode="pretrain") for seed in seeds]
        warm_single = [_one_process("single-warm", seed, init=f"pretrain-s{seed}") for seed in seeds]
        runs = [_spec(start, w, k, seed, scaling, init=f"pretrain-s{seed}" if start == "warm" else None)
                for seed in seeds for start in ("cold", "warm") for k in s.nsync for w in s.workers]
        # The ablation: each worker keeps --momentum as given, to separate staleness from the
        # per-N change of optimizer (`--momentum-scaling none`).
        ablation = [_spec("warm-mnone", w, k, seed, scaling, init=f"pretrain-s{seed}", momentum_scaling="none")
                    for seed in seeds for k in s.nsync for w in s.workers if w > 1]
        return pre + single + warm_single + runs + ablation
    if s.name == "sync-vs-async":  # one worker is the same either way: only async runs it
        return single + [_spec(mode, w, k, seed, scaling, sync=mode == "sync")
                         for seed in seeds for k in s.nsync for w in s.workers for mode in ("async", "sync")
                         if not (mode == "sync" and w == 1)]
    if s.name == "staleness":
        return single + [_spec("staleness-lr" if on else "plain", w, k, seed, "staleness" if on else "none")
                         for seed in seeds for k in s.nsync for w in s.workers for on in (False, True)]
    raise ValueError(f"unknown experiment {s.name!r}")


def sweep_momentum_scaling(spec):
    """Each worker's momentum in a sweep run that does not set it: as given with the averaging
    server (`minasgd train`'s defaults), lowered for staleness with the summing one (the
    settings of the committed sweeps)."""
    return "none" if spec.get("lr_scaling", "none") == "average" else "staleness"
