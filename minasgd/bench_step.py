"""`minasgd bench step`: time one training step (forward + backward + SGD update) of a net.

Our step on the chosen backend vs the identical PyTorch net (when PyTorch is
installed) measured in the same run, on the same inputs, so the ratio means
something even on a shared, noisy machine. `measure` returns the numbers; the command line
shows them (`minasgd.dashboard.show_bench_step`).
"""

import time

import numpy as np

from . import backends, torch_reference
from .model import Model
from .optim import SGD
from .timer import median_seconds


def _median_time(step, repeats, sync):
    # one warm-up call (JIT compilation, allocator), then the median of single steps
    return float(median_seconds(step, repeats=repeats, sync=sync))


def measure(backend="numpy", model_name="alexnet-mini", batch_size=128, repeats=10, device=None):
    be = backends.get(backend, device)
    model = Model(model_name, be, seed=0)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((batch_size, *model.input_shape)).astype(np.float32)
    y_np = rng.integers(0, model.num_classes, batch_size).astype(np.int32)
    x, y = be.asarray(x_np), be.asarray(y_np)
    opt = SGD(be, model.num_params, momentum=0.9, weight_decay=5e-4)
    counter = iter(range(10**9))

    def ours():
        model.loss_and_grad(x, y, next(counter))
        opt.step(model.params, model.grads, 0.01)

    t0 = time.perf_counter()
    ours()
    be.synchronize()
    first = time.perf_counter() - t0
    result = {"backend": be.NAME, "device": be.DEVICE, "model": model_name, "batch_size": batch_size,
              "first_step_seconds": first, "ours_seconds": _median_time(ours, repeats, be.synchronize)}
    result["ours_images_per_second"] = batch_size / result["ours_seconds"]

    if torch_reference.available():
        import torch

        tdev = "cuda" if be.NAME == "cuda" else "cpu"
        if tdev == "cuda" and not torch.cuda.is_available():
            return result
        net = torch_reference.build(model, tdev)
        topt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        tx = torch.from_numpy(x_np).to(tdev)
        ty = torch.from_numpy(y_np.astype(np.int64)).to(tdev)
        loss_fn = torch.nn.CrossEntropyLoss()

        def theirs():
            topt.zero_grad(set_to_none=True)
            loss_fn(net(tx), ty).backward()
            topt.step()

        sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
        result["torch_seconds"] = _median_time(theirs, repeats, sync)
        result["torch_device"] = tdev
        result["torch_threads"] = torch.get_num_threads()
        result["ratio_ours_over_torch"] = result["ours_seconds"] / result["torch_seconds"]
    return result
