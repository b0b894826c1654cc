"""The parameter server: asynchronous SGD across worker processes (Paine et al., 2013).

N workers (the paper's GPU clients) each train the model on their own shard of the data and
talk to one central server every `nsync` mini-batches: push the sum of the steps they took
(what they moved), fetch fresh parameters. The server applies each push the moment it arrives
(async, as in the paper and in DistBelief's Downpour SGD), or one push per worker per round
(`--sync`, the baseline); by default 1/N of each (`--lr-scaling average`: the parameters move by
the mean of the workers' displacements).

Read it in this order; each module does one job:

    protocol.py   the wire format: a 32-byte header + raw float32 or a small JSON body, and the
                  words both sides share (Refused and its codes, STATS_FIELDS)
    server.py     ParameterServer: the lock and the counters around five units, each one job:
      update.py     the update rule: what a push means, its scale, the checked out-of-place step
      sync.py       the sync round: its sum, members, deadline, excused workers
      registry.py   the workers: ids, names, npush, who is connected, their STATS
      staleness.py  staleness in mini-batches and its bounded histogram
      resume.py     checkpoints of the whole state and the checks before a resume
      stats.py      the statistics the dashboard, metrics.jsonl and a worker's STATS see
                  No sockets: a transport calls join / fetch_into / push / leave
    session.py    what the messages mean: the server's request loop and a worker's Client
    tcp.py        TcpServer (one thread per worker): frames <-> those calls; its accept thread
                  and handshakes in tcp_accept.py; tcp_client.py the worker's TcpClient
    mpi.py        the same over MPI (mpiexec): rank 0 serves, ranks 1..N are the workers
                  (their MpiClient in mpi_client.py)
    worker.py     Worker: fetch, nsync local steps summing what they moved, push, repeat
    monitor.py    test accuracy, metrics.jsonl, checkpoints (it draws nothing)
    run.py        what a run does whatever the transport: create_server, watch, finish_run
    launcher.py   `minasgd train --workers N`: the server here, N spawned worker processes
    bench.py      `minasgd bench ps`: goodput vs a raw socket, the workers speed-up, and
                  (--hostile) the workers' rate while another process attacks the server

Nothing here touches a terminal or parses arguments: the runs report through `on_event`
callbacks and the benches return numbers. The flags and the handlers of `train --workers`,
`serve`, `work` and `bench ps` are in `minasgd/cli/ps.py` and `minasgd/cli/bench.py`; the live
server dashboard and the tables are in `minasgd/dashboard/` (ServerView, ServerDashboard: `dashboard/server.py`).
"""
