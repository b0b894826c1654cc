"""The MPI half of `minasgd bench ps --transport mpi`: push, fetch and push+fetch round trips per
second through `MpiServer`/`MpiClient`, and through bare MPI Send/Recv of the same bytes (the baseline).

`goodput_mpi` starts `mpiexec -n 2 python -m minasgd.ps.mpi_bench bench N SECONDS` and reads the one
JSON line rank 1 prints; `minasgd.ps.bench` puts the numbers beside the socket's.
"""

import json
import subprocess
import sys

import numpy as np

from .mpi import MpiClient, MpiServer, final_barrier, import_mpi, mpiexec_command
from .session import round_trips

TAG_RAW = 110  # the bare Send/Recv baseline


def goodput_mpi(n, seconds=1.5):
    """{op: {"mpi": round trips/s, "raw_mpi": round trips/s}}, measured by `mpiexec -n 2` ranks of our own."""
    command, env = mpiexec_command(2)
    command += [sys.executable, "-m", "minasgd.ps.mpi_bench", "bench", str(n), str(seconds)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120 + 20 * seconds)
    except subprocess.TimeoutExpired:
        raise OSError(f"the MPI bench (`{' '.join(command)}`) did not finish in time") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise OSError(f"the MPI bench failed (exit {done.returncode}): {last}")
    return json.loads(lines[-1])


def _bench_ranks(n, seconds):
    """Under `mpiexec -n 2`: rank 0 serves a ParameterServer of n parameters (then a bare echo);
    rank 1 times both and prints one JSON line."""
    from ..timer import rate
    from .server import ParameterServer

    MPI = import_mpi()
    comm = MPI.COMM_WORLD.Dup()
    if comm.Get_size() != 2:
        raise SystemExit("the MPI bench runs with exactly 2 ranks (mpiexec -n 2)")
    data = np.zeros(n, np.float32)
    op, ack = np.zeros(1, np.int64), np.zeros(1, np.int64)
    if comm.Get_rank() == 0:
        ps = ParameterServer(data, model_name="bench", fingerprint="bench", total_steps=10**12, lr=1e-6, momentum=0.9)
        MpiServer(ps, comm).start().join(grace=None)  # until the client's BYE
        while True:  # the baseline: blocking Send/Recv of the same bytes, no header, no checks
            comm.Recv([op, MPI.INT64_T], 1, tag=TAG_RAW)
            if op[0] == 1:
                comm.Recv([data, MPI.FLOAT], 1, tag=TAG_RAW)
                comm.Send([ack, MPI.INT64_T], 1, tag=TAG_RAW)
            elif op[0] == 2:
                comm.Send([data, MPI.FLOAT], 1, tag=TAG_RAW)
            else:
                break
    else:
        grad, params = np.full(n, 1e-3, np.float32), np.empty(n, np.float32)
        client = MpiClient(comm)
        client.hello("bench")
        ours = round_trips(client, grad, params)
        def raw(code, buffer=None):
            op[0] = code
            comm.Send([op, MPI.INT64_T], 0, tag=TAG_RAW)
            if code == 1:
                comm.Send([grad, MPI.FLOAT], 0, tag=TAG_RAW)
                comm.Recv([ack, MPI.INT64_T], 0, tag=TAG_RAW)
            elif code == 2:
                comm.Recv([params, MPI.FLOAT], 0, tag=TAG_RAW)

        bare = {"push": lambda: raw(1), "fetch": lambda: raw(2), "push+fetch": lambda: (raw(1), raw(2))}
        results = {op_name: {"mpi": rate(ours[op_name], seconds)} for op_name in ours}  # bench.OPS, in order
        client.close("bench over")
        for op_name in ours:
            results[op_name]["raw_mpi"] = rate(bare[op_name], seconds)
        raw(0)
        print(json.dumps({**results, "library": MPI.Get_library_version().splitlines()[0].strip()}), flush=True)
    final_barrier(MPI, comm, timeout=30.0)


if __name__ == "__main__":  # python -m minasgd.ps.mpi_bench bench N SECONDS (started by goodput_mpi under mpiexec)
    if len(sys.argv) != 4 or sys.argv[1] != "bench":
        sys.exit("usage: mpiexec -n 2 python -m minasgd.ps.mpi_bench bench NUM_PARAMS SECONDS")
    _bench_ranks(int(sys.argv[2]), float(sys.argv[3]))
