"""A worker (the paper's "GPU client"): fetch, train a few mini-batches locally, push, repeat.

    worker = Worker(client, model, train_x, train_y, batch_size=64, npush=4, nfetch=4,
                    schedule=Schedule(base_lr=0.02, total_steps=2000, warmup_steps=100))
    worker.run()            # until the server says training is over

One round of the loop, on any backend (the model and the step sum stay on the device):

    fetch the parameters (server version v)
    for each of nsync mini-batches:
        lr = schedule(server's step count + mini-batches since)   the run's warm-up + cosine
        g = gradient of the batch + weight_decay * w
        v = momentum * v + g     the single-process trainer's SGD with momentum, run locally;
        w -= lr * v              v is kept across fetches, so momentum sees every gradient
        step_sum += lr * v       exactly what w just moved
    push step_sum, "computed from version v"      one device -> host copy per push
    step_sum = 0

The push is the worker's displacement: the sum of the steps it took, each at the lr it took it
with, and the number of mini-batches in it. The server subtracts it at a fixed scale, 1 or 1/N
(`--lr-scaling average`; `minasgd.ps.update`, `UpdateRule.scale`), so what the server applies is
what the worker moved (times that scale), whatever the lr schedule did in between; with one
worker the server's parameters follow the path of single-process training with the same --lr
and --momentum, whatever nsync is (bit for bit at nsync 1). With N async workers each push was
computed from parameters a few mini-batches old (staleness), and the averaging server moves the
parameters by the mean of the workers' displacements rather than their sum; in sync rounds (the
default) no push is stale and the server adds a round's displacements up.

The lr of each local step is the run's schedule (`minasgd.optim.Schedule`, sent in WELCOME)
at the worker's estimate of the run's step count: the server's count in its last reply plus the
mini-batches this worker took since (other workers' progress since then shows at the next reply).

With the server's Adagrad (Downpour SGD), the worker takes no local steps (its parameters change
only when it fetches), as Downpour's model replicas did, and pushes the plain gradient sum, which
Adagrad scales per parameter.
`npush` and `nfetch` (both `nsync` by default, as in the paper) may differ: with nfetch > npush
a worker pushes several times between fetches; with nfetch < npush it fetches more often.

`client` is the transport: anything with `fetch_into(out) -> version or None`,
`push(step_sum, base_version, batches) -> {"version", "steps", "lr", "done"}`, `stats(numbers) -> dict` and
`close(reason)`, plus `server_hello` (a dict with "model") and `hello(fingerprint, info) -> config`
for `connect_and_train`. Two transports provide them: `minasgd.ps.tcp.TcpClient` (sockets) and
`minasgd.ps.mpi_client.MpiClient` (MPI ranks).
"""

import os
import socket
import time

import numpy as np

from .. import backends, data
from ..model import Model
from ..optim import Schedule
from ..threads import blas_threads_for_training
from ..train import TrainConfig, load_dataset, prepare_batch


class Worker:
    def __init__(self, client, model, train_x, train_y, *, batch_size, npush, nfetch, schedule,
                 start_step=0, momentum=0.0, weight_decay=0.0, local_steps=True, seed=0, report_every=1.0):
        if len(train_y) < batch_size:
            raise ValueError(f"a worker's shard has {len(train_y)} images, fewer than one batch of {batch_size}")
        if npush < 1 or nfetch < 1:
            raise ValueError(f"npush and nfetch must be >= 1, got npush={npush} nfetch={nfetch}")
        self.client, self.model, self.be = client, model, model.be
        self.train_x, self.train_y = train_x, train_y
        self.batch_size, self.npush, self.nfetch = batch_size, npush, nfetch
        self.schedule, self.momentum, self.weight_decay = schedule, momentum, weight_decay
        self.server_steps = start_step  # the run's step count in the server's last reply
        self.steps_since_reply = 0  # our mini-batches since then
        self.lr = schedule(start_step)  # the lr of our last step (reported in STATS)
        self.local_steps = local_steps  # False with the server's Adagrad: only fetches move w
        self.rng = np.random.default_rng(seed)
        self.report_every = report_every

        n = model.num_params
        self.host_params = np.empty(n, dtype=np.float32)  # where fetched parameters land
        self.grad_sum = self.be.zeros(n)  # what we moved since the last push (lr * v summed), on the device
        self.velocity = self.be.zeros(n)  # v = momentum * v + g + weight_decay * w, kept across syncs
        self.batches_in_sum = 0
        self.fetched_version = self.base_version = 0
        self.steps = self.images = self.pushes = self.fetches = 0
        self.last_loss = None  # the last batch's loss, left on the device until a push
        self.loss = float("nan")
        self.started = self.last_report = time.perf_counter()

    # ------------------------------------------------------------------ the loop

    def run(self):
        """Train until the server says it is over; returns this worker's numbers."""
        if not self.fetch():
            return self.numbers()
        for x_u8, y in self.batches():
            self.train_step(x_u8, y)
            if self.batches_in_sum == self.npush and self.push()["done"]:
                break
            if self.steps % self.nfetch == 0 and not self.fetch():
                break
        return self.numbers()

    def batches(self):
        """Mini-batches from this worker's shard, reshuffled every pass, forever."""
        while True:
            yield from data.batches(self.train_x, self.train_y, self.batch_size, self.rng, drop_last=True)

    def train_step(self, x_u8, y):
        be, model = self.be, self.model
        x, labels = prepare_batch(be, model, x_u8, y)
        self.last_loss = model.loss_and_grad(x, labels, self.steps)
        if self.local_steps:  # SGD: step, and add exactly what w moved to the sum
            self.lr = lr = self.schedule(self.server_steps + self.steps_since_reply)
            be.sgd_update(model.params, model.grads, self.velocity, lr, self.momentum, self.weight_decay)
            be.axpy(self.grad_sum, lr, self.velocity)
        else:  # Adagrad on the server: no local step, push the gradient sum (weight decay included)
            be.sgd_update(model.params, model.grads, self.velocity, 0.0, 0.0, self.weight_decay)
            be.axpy(self.grad_sum, 1.0, self.velocity)
        self.steps += 1
        self.steps_since_reply += 1
        self.batches_in_sum += 1
        self.images += len(y)

    # ------------------------------------------------------------------ talking to the server

    def fetch(self):
        """Replace the local parameters by the server's; False once training is over."""
        version = self.client.fetch_into(self.host_params)
        if version is None:
            return False
        self.model.set_params(self.host_params)
        self.fetched_version = version
        if self.batches_in_sum == 0:  # the next gradient sum starts from these parameters
            self.base_version = version
        self.fetches += 1
        return True

    def push(self):
        """Send what we moved (one device -> host copy), start a new sum, learn the run's step count."""
        self.loss = float(self.be.to_numpy(self.last_loss)[0])
        if not np.isfinite(self.loss):
            raise FloatingPointError(f"loss became {self.loss} at step {self.steps}; try a smaller --lr")
        grad = self.be.to_numpy(self.grad_sum)  # on the numpy backend this is the array itself
        reply = self.client.push(grad, self.base_version, self.batches_in_sum)
        self.grad_sum = self.be.zeros(self.model.num_params)
        self.batches_in_sum = 0
        self.base_version = self.fetched_version  # the next gradients start from these parameters
        if not reply.get("dropped"):  # (a push dropped after a reconnect: the old count stays)
            self.server_steps, self.steps_since_reply = int(reply["steps"]), 0
        self.pushes += 1
        if time.perf_counter() - self.last_report >= self.report_every or reply["done"]:
            self.client.stats(self.numbers())
            self.last_report = time.perf_counter()
        return reply

    def numbers(self):
        seconds = time.perf_counter() - self.started
        return {"loss": self.loss, "steps": self.steps, "images": self.images, "pushes": self.pushes,
                "images_per_second": self.images / max(seconds, 1e-9), "lr": self.lr, "seconds": seconds}


# ------------------------------------------------------------------ one worker, start to end

def connect_and_train(client, *, backend="numpy", gpu=None, model_name=None, shard=None,
                      shard_index=0, shard_count=1, data_root=None, nsync=None, nfetch=None,
                      npush=None, name=None):
    """Handshake over `client`, build the model and the data, run a `Worker`; returns its numbers.

    `shard`: (train_x, train_y) given by a launcher; else the worker loads the dataset the server
    names and keeps shard `shard_index` of `shard_count`.
    """
    hello = client.server_hello
    be = backends.get(backend, gpu)
    model = Model(model_name or hello["model"], be)
    name = name or f"{socket.gethostname()}:{os.getpid()}"
    info = {"name": name, "backend": be.NAME, "device": be.DEVICE}
    if npush or nsync:  # the most mini-batches our pushes will sum (the server checks each push's count)
        info["npush"] = npush or nsync
    config = client.hello(model.fingerprint(), info, num_params=model.num_params)
    # Its own dropout masks and shuffling; worker 1 draws exactly what one process with --seed
    # draws, so one worker at nsync 1 repeats single-process training step for step.
    model.seed = config.get("seed", 0) + 1000 * (config["worker_id"] - 1)

    if shard is None:
        cfg = TrainConfig(dataset=config["dataset"], data_root=data_root, train_limit=config.get("train_limit"),
                          quiet=True)
        shard = load_dataset(cfg).shard(shard_index, shard_count)
        shard = (shard.train_x, shard.train_y)
    nsync = nsync or config["nsync"]
    worker = Worker(client, model, shard[0], shard[1], batch_size=config["batch_size"],
                    npush=npush or nsync, nfetch=nfetch or nsync, schedule=Schedule.from_dict(config.get("schedule")),
                    start_step=config.get("steps", 0),
                    momentum=config.get("momentum", 0.0), weight_decay=config.get("weight_decay", 0.0),
                    local_steps=config.get("local_steps", True), seed=model.seed)
    try:
        with blas_threads_for_training():  # one BLAS thread per worker (`minasgd.threads`), on any transport
            numbers = worker.run()
    except KeyboardInterrupt:
        client.close("interrupted")
        raise
    except Exception as e:
        client.close(f"error: {e}")
        raise
    client.close("finished")
    return numbers
