"""`minasgd bench ps`: what the parameter server costs, and what the workers buy.

1. Goodput, the way ps-lite reports it: push-only, fetch-only and push+fetch round trips per
   second and MB/s for a vector the size of `--model`, through our server (in its own process),
   against a raw loopback socket moving exactly the same bytes in the same run (a bare echo
   process: no header, no checks, no optimizer). The ratio is ours / raw. With `--transport mpi`
   the same three operations also go through the MPI transport (`minasgd.ps.mpi`: two ranks of an
   `mpiexec -n 2` started here) and through bare MPI Send/Recv, and the table adds MPI / socket.
   The server is configured as the default run's (`--momentum-at worker`, `bench_common.BENCH_SERVER`):
   it checks each push and applies w -= lr * push, with no velocity of its own.
2. Speed-up: images/s and the time to reach `--target` test accuracy for `--workers-list`
   (default 1,2,4) on the shapes dataset, with single-process training as the first row.
3. `--hostile`: the push+fetch rate of N real workers, undisturbed and while a second process
   holds M idle connections and sends K malformed frames, as a ratio measured in one run.
"""

import json
import os
import socket
import sys
import time

import numpy as np

from .. import backends
from ..model import Model
from ..timer import rate
from ..threads import blas_threads_for_children
from .launcher import PsOptions
from .bench_common import BENCH_SERVER

OPS = ("push", "fetch", "push+fetch")


# ------------------------------------------------------------------ the two servers

def _ps_process(n, port_queue, stop_event):
    """Our parameter server for n parameters, alone in a process, until `stop_event`."""
    from .server import ParameterServer
    from .tcp import TcpServer, listen

    ps = ParameterServer(np.zeros(n, np.float32), **BENCH_SERVER)
    tcp = TcpServer(ps, listen("127.0.0.1", 0)).start()
    port_queue.put(tcp.address[1])
    stop_event.wait()
    tcp.close()


def _raw_process(n, port_queue, stop_event):
    """A bare socket doing the same transfers: 1 op byte, then n float32 in or out, 8-byte acks."""
    listener = socket.create_server(("127.0.0.1", 0))
    port_queue.put(listener.getsockname()[1])
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = np.zeros(n, np.float32)
    view, op = memoryview(data).cast("B"), bytearray(1)
    while sock.recv_into(op, 1):
        if op[0] == ord("p"):  # push: receive the vector, send an ack
            _recv_exactly(sock, view)
            sock.sendall(b"\0" * 8)
        else:  # fetch: send the vector
            sock.sendall(view)


def _recv_exactly(sock, view):
    got = 0
    while got < len(view):
        got += sock.recv_into(view[got:])


def _start(target, n):
    import multiprocess

    ctx = multiprocess.get_context("spawn")
    port_queue, stop_event = ctx.Queue(), ctx.Event()
    with blas_threads_for_children(1):
        process = ctx.Process(target=target, args=(n, port_queue, stop_event), daemon=True)
        process.start()
    return process, stop_event, port_queue.get(timeout=60)


# ------------------------------------------------------------------ the measurements

ROUNDS = 5  # each rate is the median of this many samples, ours and raw alternating


def goodput(n, seconds=1.5, rounds=ROUNDS):
    """{op: {"ours": round trips/s, "raw": round trips/s}} for a float32 vector of n elements.

    Both servers run at once; every round times each operation on ours, then on the raw socket,
    for seconds / rounds each, so a busy moment of the machine hits both. Rates are medians.
    """
    from .bench_common import round_trips
    from .tcp import TcpClient

    grad = np.full(n, 1e-3, np.float32)
    params = np.empty(n, np.float32)
    ours_process, ours_stop, ours_port = _start(_ps_process, n)
    raw_process, raw_stop, raw_port = _start(_raw_process, n)
    try:
        client = TcpClient(("127.0.0.1", ours_port))
        client.hello("bench")
        ours = round_trips(client, grad, params)
        sock = socket.create_connection(("127.0.0.1", raw_port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ack, view = bytearray(8), memoryview(params).cast("B")

        def raw_push():
            sock.sendall(b"p")
            sock.sendall(memoryview(grad).cast("B"))
            _recv_exactly(sock, memoryview(ack))

        def raw_fetch():
            sock.sendall(b"f")
            _recv_exactly(sock, view)

        raw = {"push": raw_push, "fetch": raw_fetch, "push+fetch": lambda: (raw_push(), raw_fetch())}
        samples = {op: {"ours": [], "raw": []} for op in OPS}
        for _ in range(rounds):
            for op in OPS:
                samples[op]["ours"].append(rate(ours[op], seconds / rounds))
                samples[op]["raw"].append(rate(raw[op], seconds / rounds))
        client.close()
        sock.close()
    finally:
        for process, stop in ((ours_process, ours_stop), (raw_process, raw_stop)):
            stop.set()
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
    return {op: {side: float(np.median(v)) for side, v in sides.items()} for op, sides in samples.items()}


def server_work_per_push(n, repeats=50):
    """Seconds the server spends on one push outside the network: checks + optimizer update."""
    from .server import ParameterServer

    ps = ParameterServer(np.zeros(n, np.float32), **BENCH_SERVER)
    wid = ps.join("bench", {})
    grad = np.full(n, 1e-3, np.float32)
    t0 = time.perf_counter()
    for _ in range(repeats):
        ps.push(wid, grad, ps.version)
    return (time.perf_counter() - t0) / repeats


# ------------------------------------------------------------------ the speed-up table

def _single_process(cfg):
    from ..train import train

    return train(cfg)


def speedup(model, backend, gpu, epochs, train_limit, nsync, target, workers_list="1,2,4"):
    """Train on shapes with single-process and each worker count; one row per run (a line on
    stderr after each, since stdout may be --json)."""
    import multiprocess

    from ..train import TrainConfig
    from .launcher import train_distributed

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rows = []
    counts = [0] + [int(k) for k in workers_list.split(",")]
    for workers in counts:
        cfg = TrainConfig(dataset="shapes", model=model, backend=backend, gpu=gpu,
                          epochs=epochs, train_limit=train_limit, quiet=True,
                          out=f"runs/bench-ps-{time.strftime('%Y%m%d-%H%M%S')}-w{workers}")
        t0 = time.perf_counter()
        if workers == 0:  # in a fresh process with the same BLAS threads a single worker gets
            ctx = multiprocess.get_context("spawn")
            with blas_threads_for_children(max(1, cores - 1)), ctx.Pool(1) as pool:
                summary = pool.apply(_single_process, (cfg,))
        else:
            summary = train_distributed(cfg, PsOptions(workers=workers, nsync=nsync))
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
        reached = [r["time"] for r in records if r["kind"] == "epoch" and r["test_accuracy"] >= target]
        rows.append({"workers": workers, "images_per_second": summary["images_per_second"],
                     "test_accuracy": summary["test_accuracy"], "seconds_to_target": reached[0] if reached else None,
                     "train_seconds": summary["train_seconds"], "wall_seconds": wall,
                     "staleness": summary.get("staleness"), "pushes": summary.get("pushes"), "run": cfg.out})
        print(f"  workers {workers}: {rows[-1]['images_per_second']:.0f} images/s, "
              f"test accuracy {rows[-1]['test_accuracy']:.1%}", file=sys.stderr)  # stdout may be --json
    return rows


# ------------------------------------------------------------------ the command

SIZES = (1, 10)  # the model's vector, and one ten times larger


def _rates(result, mb):
    for op, r in result.items():
        moved = 2 * mb if op == "push+fetch" else mb
        r.update(ours_mb_per_second=r["ours"] * moved, raw_mb_per_second=r["raw"] * moved, ratio=r["ours"] / r["raw"])
        if "mpi" in r:
            r.update(mpi_mb_per_second=r["mpi"] * moved, raw_mpi_mb_per_second=r["raw_mpi"] * moved,
                     mpi_vs_socket=r["mpi"] / r["ours"], mpi_vs_raw_mpi=r["mpi"] / r["raw_mpi"])
    return result


def measure(model, seconds=1.5, transport="tcp", training=None):
    """The numbers of `minasgd bench ps` (the CLI prints them, or `minasgd.dashboard.show_bench_ps`
    draws them): goodput for each of SIZES, the server's work per push, and with `training` (the
    keyword arguments of `speedup`) the speed-up table."""
    n = Model(model, backends.get("numpy")).num_params
    result = {"model": model, "num_params": n, "megabytes": 4 * n / 1e6, "rounds": ROUNDS, "sizes": [],
              "server_seconds_per_push": server_work_per_push(n)}
    for times in SIZES:
        size = {"times": times, "num_params": n * times, "megabytes": 4 * n * times / 1e6,
                "goodput": goodput(n * times, seconds)}
        if transport == "mpi":
            from .mpi_bench import goodput_mpi

            mpi = goodput_mpi(n * times, seconds, ROUNDS)
            result["mpi_library"] = mpi.pop("library", None)
            for op, r in mpi.items():
                size["goodput"][op].update(r)
        _rates(size["goodput"], size["megabytes"])
        result["sizes"].append(size)
    result["goodput"] = result["sizes"][0]["goodput"]  # the model's size, as before
    if training is not None:
        result["speedup"] = speedup(model=model, **training)
    return result


# ------------------------------------------------------------------ under attack (--hostile)

def _raise_fd_limit(wanted):
    """Raise this process's soft limit on open files towards `wanted` (up to the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _hostile_ps_process(n, port_queue, stop_event, max_connections):
    """Our server (default settings but the connection cap) in its own process, until `stop_event`."""
    from .server import ParameterServer
    from .tcp import TcpServer, listen

    _raise_fd_limit(max_connections + 64)
    ps = ParameterServer(np.zeros(n, np.float32), **BENCH_SERVER)
    tcp = TcpServer(ps, listen("127.0.0.1", 0), max_connections=max_connections).start()
    port_queue.put(tcp.address[1])
    stop_event.wait()
    tcp.close()


def _bench_worker(port, n, counter, stop_event):
    """A worker doing push+fetch round trips as fast as it can; `counter` counts them."""
    from .tcp import TcpClient

    grad, params = np.full(n, 1e-3, np.float32), np.empty(n, np.float32)
    client = TcpClient(("127.0.0.1", port), timeout=60)
    client.hello("bench", {"name": f"bench worker {os.getpid()}"})
    version = client.fetch_into(params)
    while not stop_event.is_set():
        version = client.push(grad, version, 1)["version"]
        client.fetch_into(params)
        with counter.get_lock():
            counter.value += 1
    client.close("bench over")


MALFORMED = [  # what an attacker sends instead of a HELLO (after reading the server's)
    b"\x00" * 32,
    b"EVIL" + b"\x00" * 28,
    b"MASG\x01\x01\x00\x00" + (2**62).to_bytes(8, "little") + b"\x00" * 16,  # a huge HELLO
    b"MASG\x01\x01\x00\x00" + (100).to_bytes(8, "little") + b"\x00" * 16 + b"{",  # truncated
    b"MASG\x01\x01\x00\x00" + (30_000).to_bytes(8, "little") + b"\x00" * 16 + b"[" * 30_000,  # deep JSON
    b"MASG\x01\x01\x00\x00" + (12).to_bytes(8, "little") + b"\x00" * 16 + b"\x80\x04\x95pickle!!",
]


def _attacker(port, idle, malformed, seconds, commands, replies):
    """On "open": open `idle` connections that never speak, answer, then send `malformed` bad
    frames (each on its own connection) spread over `seconds`. On "close": close them all."""
    _raise_fd_limit(idle + 64)
    held = []
    for command in iter(commands.get, "stop"):
        if command == "close":
            for sock in held:
                sock.close()
            held = []
            replies.put("closed")
            continue
        refused = 0
        for _ in range(idle):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                refused += 1
        replies.put({"held": len(held), "refused_at_connect": refused})
        answered, pause = 0, seconds / max(1, malformed)
        for i in range(malformed):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.recv(1 << 16)  # the server's HELLO (or a "server full" ERROR)
                    sock.sendall(MALFORMED[i % len(MALFORMED)])
                    sock.shutdown(socket.SHUT_WR)
                    answered += bool(sock.recv(1 << 16))
            except OSError:
                pass
            time.sleep(pause)
        replies.put({"malformed_answered": answered})
    for sock in held:
        sock.close()


def hostile(n, workers=2, idle=500, malformed=200, seconds=3.0, rounds=3):
    """Push+fetch round trips/s of `workers` real workers, undisturbed and under attack (a second
    process holding `idle` idle connections and sending `malformed` bad frames), alternating
    `rounds` times in one run against one server process (so a busy machine's drift cancels).
    Returns the rates and the ratio attack / undisturbed."""
    import multiprocess

    ctx = multiprocess.get_context("spawn")
    port_queue, stop_server = ctx.Queue(), ctx.Event()
    with blas_threads_for_children(1):
        server = ctx.Process(target=_hostile_ps_process, args=(n, port_queue, stop_server, idle + workers + 16),
                             daemon=True)
        server.start()
        port = port_queue.get(timeout=60)
        counter, stop_workers = ctx.Value("q", 0), ctx.Event()
        procs = [ctx.Process(target=_bench_worker, args=(port, n, counter, stop_workers), daemon=True)
                 for _ in range(workers)]
        for p in procs:
            p.start()
    commands, replies = ctx.Queue(), ctx.Queue()
    attacker = ctx.Process(target=_attacker, args=(port, idle, malformed, seconds, commands, replies), daemon=True)
    attacker.start()

    def measure():
        c0, t0 = counter.value, time.perf_counter()
        time.sleep(seconds)
        return counter.value - c0, time.perf_counter() - t0

    calm, attacked, held, refused, answered = [0, 0.0], [0, 0.0], [], 0, 0
    try:
        deadline = time.monotonic() + 60
        while counter.value < 10 * workers:  # all started
            if time.monotonic() > deadline:
                raise RuntimeError("the bench workers did not start")
            time.sleep(0.05)
        time.sleep(seconds)  # warm-up: caches, the server's first allocations
        for _ in range(rounds):
            count, dt = measure()
            calm[0] += count
            calm[1] += dt
            commands.put("open")
            opened = replies.get(timeout=120)
            held.append(opened["held"])
            refused += opened["refused_at_connect"]
            count, dt = measure()
            attacked[0] += count
            attacked[1] += dt
            answered += replies.get(timeout=120)["malformed_answered"]
            commands.put("close")
            replies.get(timeout=60)
            time.sleep(0.2)  # the server notices the hang-ups
    finally:
        commands.put("stop")
        stop_workers.set()
        for p in procs:
            p.join(timeout=10)
        attacker.join(timeout=10)
        stop_server.set()
        server.join(timeout=10)
        for p in [*procs, server, attacker]:
            if p.is_alive():
                p.terminate()
    undisturbed, under_attack = calm[0] / calm[1], attacked[0] / attacked[1]
    return {"workers": workers, "idle": idle, "malformed": malformed, "seconds": seconds, "rounds": rounds,
            "rate_undisturbed": undisturbed, "rate_under_attack": under_attack, "ratio": under_attack / undisturbed,
            "held": min(held), "refused_at_connect": refused, "malformed_sent": malformed * rounds,
            "malformed_answered": answered}


def measure_hostile(model, workers=2, idle=500, malformed=200, seconds=3.0, rounds=3):
    """The numbers of `minasgd bench ps --hostile` (drawn by `minasgd.dashboard.show_bench_ps_hostile`)."""
    n = Model(model, backends.get("numpy")).num_params
    return {"model": model, "num_params": n, **hostile(n, workers, idle, malformed, seconds, rounds)}
