"""The same network in PyTorch, for benchmarks and cross-checks (PyTorch is optional).

`build(model)` returns a torch.nn.Module with exactly the layers of a
`minasgd.model.Model` and its current weights copied in, so both compute the
same function and a timing comparison is fair.
"""

import numpy as np


def available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def build(model, device="cpu"):
    import torch
    from torch import nn

    from .layers import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU

    modules = []
    for layer in model.layers:
        if isinstance(layer, Conv2d):
            m = nn.Conv2d(layer.c, layer.k, layer.r, stride=layer.stride, padding=layer.pad)
        elif isinstance(layer, Linear):
            m = nn.Linear(layer.d, layer.m)
        elif isinstance(layer, MaxPool2d):
            m = nn.MaxPool2d(layer.size, layer.stride)
        elif isinstance(layer, ReLU):
            m = nn.ReLU()
        elif isinstance(layer, Dropout):
            m = nn.Dropout(layer.p)
        elif isinstance(layer, Flatten):
            m = nn.Flatten()
        else:
            raise TypeError(f"no PyTorch equivalent for {type(layer).__name__}")
        if layer.param_shapes:
            flat = model.get_params()
            for owner, pname, off, shape in model.slots:
                if owner is layer:
                    value = torch.from_numpy(flat[off : off + int(np.prod(shape))].reshape(shape).copy())
                    getattr(m, "weight" if pname == "w" else "bias").data.copy_(value)
        modules.append(m)
    return nn.Sequential(*modules).to(device)
