"""The paper's experiments (`minasgd experiment NAME`) at laptop scale, as reproducible sweeps.

    minasgd experiment workers          # workers {1,2,4,8} x nsync {1,4,16}, async, cold start
    minasgd experiment warmstart        # the same from a partly trained model vs from scratch
    minasgd experiment sync-vs-async    # async vs --sync at equal workers
    minasgd experiment staleness        # staleness histogram; accuracy with/without staleness-aware lr

Each writes into its run directory (`--out`, default runs/experiment-NAME/):

    <run>/                one folder per training run (metrics.jsonl, summary.json, model.npz)
    results.csv           one row per run: time / images / server updates to the target, speed-ups
    summary.csv           one row per (group, nsync, workers): mean and std over seeds
    results.json          settings, both tables, staleness histograms, test-error curves
    report.md             the tables as markdown (what docs/paper.md shows)
    *.png                 the plots (needs matplotlib: pip install -e ".[plot]")

Runs whose summary.json exists (with the same settings) are skipped, so an interrupted sweep
resumes where it stopped, and re-running a finished one only rebuilds the tables and plots.
`--fresh` runs everything again: do that after changing the code (the report names the git
commit it ran on, but finished runs are reused whatever the code). How a sweep is built: `sweeps.py`; how the numbers are
computed (time to target, measured and projected speed-up): `analysis.py`.
"""

from .sweeps import NAMES, Settings, default_settings, plan  # the runs themselves: runner.run_sweep

__all__ = ["NAMES", "Settings", "default_settings", "plan"]
