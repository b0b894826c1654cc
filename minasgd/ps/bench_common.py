"""What both parameter-server benchmarks time, over TCP (`minasgd.ps.bench`) and over MPI
(`minasgd.ps.mpi_bench`): the server's settings and the round trips through any connected client.
(Kept out of `minasgd.ps.session`, which is the protocol's meaning and nothing else.)
"""


# The server `minasgd bench ps` measures: the default run's (`--momentum-at worker`: the workers
# keep the momentum, the server applies w -= lr * push), with so many steps that the lr stays put.
BENCH_SERVER = {"model_name": "bench", "fingerprint": "bench", "total_steps": 10**12, "lr": 1e-6, "momentum": 0.0}


def round_trips(client, grad, params):
    """The operations `minasgd bench ps` times, through any connected `Client` (after its hello):
    {"push", "fetch", "push+fetch"} -> a function doing one round trip (push from `grad`, fetch
    into `params`), each push based on the version last seen."""
    state = {"version": client.fetch_into(params)}

    def push():
        state["version"] = client.push(grad, state["version"], 1)["version"]

    def fetch():
        client.fetch_into(params)

    return {"push": push, "fetch": fetch, "push+fetch": lambda: (push(), fetch())}
