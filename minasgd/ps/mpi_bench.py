"""The MPI half of `minasgd bench ps --transport mpi`: push, fetch and push+fetch round trips per
second through `MpiServer`/`MpiClient`, and through bare MPI Send/Recv of the same bytes (the baseline),
alternating within one run, medians of `rounds` samples each.

`goodput_mpi` starts `mpiexec -n 2 python -m minasgd.ps.mpi_bench bench N SECONDS ROUNDS` and reads the
one JSON line rank 1 prints; `minasgd.ps.bench` puts the numbers beside the socket's.
"""

import json
import subprocess
import sys

import numpy as np

from .mpi import MpiServer, final_barrier, import_mpi, mpiexec_command, poll
from .mpi_client import MpiClient
from .bench_common import BENCH_SERVER, round_trips

TAG_RAW = 110  # the bare Send/Recv baseline


def goodput_mpi(n, seconds=1.5, rounds=5):
    """{op: {"mpi": round trips/s, "raw_mpi": round trips/s}}, measured by `mpiexec -n 2` ranks of our own:
    medians of `rounds` samples, ours and bare MPI alternating (as `minasgd.ps.bench.goodput` does)."""
    command, env = mpiexec_command(2)
    command += [sys.executable, "-m", "minasgd.ps.mpi_bench", "bench", str(n), str(seconds), str(rounds)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120 + 20 * seconds)
    except subprocess.TimeoutExpired:
        raise OSError(f"the MPI bench (`{' '.join(command)}`) did not finish in time") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise OSError(f"the MPI bench failed (exit {done.returncode}): {last}")
    return json.loads(lines[-1])


STOP, PUSH, FETCH, END = 0, 1, 2, 3  # the bare baseline's requests (an int64 each)


def _serve_raw(MPI, raw, data):
    """Rank 0's bare baseline, on its own communicator beside the MpiServer: between phases it waits
    like a handler thread (polling, so it takes no core from ours); within a phase it answers with
    blocking Send/Recv of the same bytes: no header, no checks."""
    op, ack = np.zeros(1, np.int64), np.zeros(1, np.int64)
    while True:
        poll(lambda: raw.Iprobe(1, TAG_RAW))
        while True:
            raw.Recv([op, MPI.INT64_T], 1, tag=TAG_RAW)
            if op[0] == PUSH:
                raw.Recv([data, MPI.FLOAT], 1, tag=TAG_RAW)
                raw.Send([ack, MPI.INT64_T], 1, tag=TAG_RAW)
            elif op[0] == FETCH:
                raw.Send([data, MPI.FLOAT], 1, tag=TAG_RAW)
            elif op[0] == END:
                break
            else:
                return


def _bench_ranks(n, seconds, rounds):
    """Under `mpiexec -n 2`: rank 0 serves a ParameterServer of n parameters (MpiServer's thread) and
    a bare echo (its main thread); rank 1 times both, alternating, and prints one JSON line."""
    from ..timer import rate
    from .server import ParameterServer

    MPI = import_mpi()
    comm = MPI.COMM_WORLD.Dup()
    raw = comm.Dup()  # the baseline's messages never meet the transport's (it receives any tag)
    if comm.Get_size() != 2:
        raise SystemExit("the MPI bench runs with exactly 2 ranks (mpiexec -n 2)")
    data = np.zeros(n, np.float32)
    if comm.Get_rank() == 0:
        server = MpiServer(ParameterServer(data, **BENCH_SERVER), comm).start()
        _serve_raw(MPI, raw, data.copy())
        server.join(grace=None)  # until the client's BYE
    else:
        grad, params = np.full(n, 1e-3, np.float32), np.empty(n, np.float32)
        client = MpiClient(comm)
        client.hello("bench")
        ours = round_trips(client, grad, params)
        op, ack = np.zeros(1, np.int64), np.zeros(1, np.int64)

        def bare(code):
            op[0] = code
            raw.Send([op, MPI.INT64_T], 0, tag=TAG_RAW)
            if code == PUSH:
                raw.Send([grad, MPI.FLOAT], 0, tag=TAG_RAW)
                raw.Recv([ack, MPI.INT64_T], 0, tag=TAG_RAW)
            elif code == FETCH:
                raw.Recv([params, MPI.FLOAT], 0, tag=TAG_RAW)

        baseline = {"push": lambda: bare(PUSH), "fetch": lambda: bare(FETCH),
                    "push+fetch": lambda: (bare(PUSH), bare(FETCH))}
        samples = {name: {"mpi": [], "raw_mpi": []} for name in ours}  # push, fetch, push+fetch
        for _ in range(rounds):
            for name in ours:
                samples[name]["mpi"].append(rate(ours[name], seconds / rounds))
                samples[name]["raw_mpi"].append(rate(baseline[name], seconds / rounds))
                bare(END)
        bare(STOP)
        client.close("bench over")
        results = {name: {side: float(np.median(v)) for side, v in sides.items()} for name, sides in samples.items()}
        print(json.dumps({**results, "library": MPI.Get_library_version().splitlines()[0].strip()}), flush=True)
    final_barrier(MPI, comm, timeout=30.0)


if __name__ == "__main__":  # python -m minasgd.ps.mpi_bench bench N SECONDS ROUNDS (started by goodput_mpi)
    if len(sys.argv) != 5 or sys.argv[1] != "bench":
        sys.exit("usage: mpiexec -n 2 python -m minasgd.ps.mpi_bench bench NUM_PARAMS SECONDS ROUNDS")
    _bench_ranks(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
