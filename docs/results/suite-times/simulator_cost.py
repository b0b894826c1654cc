"""CPU seconds of four simulated launches, with kernels/simulator.py's block loop and with Numba's own.

    python docs/results/suite-times/simulator_cost.py > docs/results/suite-times/simulator_cost.md

Each launch is run once untimed, then timed three times (the median of `time.process_time()`,
which counts every thread of this process). The two loops take turns, launch by launch.
"""

import os
import statistics
import subprocess
import time

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402
from numba import cuda, float32  # noqa: E402
from numba.cuda.simulator import kernel as sim  # noqa: E402

from minasgd.kernels import common, gemm, reduce, simulator  # noqa: E402,F401 - common installs the loop


@cuda.jit
def write_one(x):
    x[cuda.grid(1)] = float32(1)


rng = np.random.default_rng(0)
a = cuda.to_device(rng.standard_normal((33, 37)).astype(np.float32))
b = cuda.to_device(rng.standard_normal((37, 29)).astype(np.float32))
ones = cuda.to_device(np.zeros(1536, np.float32))
values = cuda.to_device(rng.standard_normal(2000).astype(np.float32))
LAUNCHES = {
    "1,536 threads write one element each (no barrier: in order)": lambda: write_one[6, 256](ones),
    "naive GEMM 33 x 37 x 29 (no barrier: in order)": lambda: gemm.gemm(a, b, version="naive"),
    "16 x 16 tiled GEMM 33 x 37 x 29 (6 barriers a thread: in steps)": lambda: gemm.gemm(a, b, version="tiled", tile=16),
    "block sum of 2,000 floats (barriers in a loop: in steps)": lambda: reduce.block_sum(values),
}
LOOPS = {
    "Numba's own loop": (simulator.NUMBA_OWN["BlockManager.run"], simulator.NUMBA_OWN["BlockThread.syncthreads"]),
    "kernels/simulator.py": (simulator.run_block, simulator.syncthreads),
}


def cpu_seconds(launch):
    launch()
    samples = []
    for _ in range(3):
        t = time.process_time()
        launch()
        samples.append(time.process_time() - t)
    return statistics.median(samples)


commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"CPU seconds per launch on the CUDA simulator (median of 3), commit {commit}, {os.cpu_count()} cores:\n")
print("| launch | " + " | ".join(LOOPS) + " | ratio |")
print("| --- | " + " | ".join("---:" for _ in LOOPS) + " | ---: |")
for name, launch in LAUNCHES.items():
    seconds = []
    for run, syncthreads in LOOPS.values():
        sim.BlockManager.run, sim.BlockThread.syncthreads = run, syncthreads
        seconds.append(cpu_seconds(launch))
    print(f"| {name} | " + " | ".join(f"{s:.3f}" for s in seconds) + f" | {seconds[0] / seconds[1]:.0f}x |")
