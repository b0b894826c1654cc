"""The layers of the network: each a small class with `forward` and `backward`.

A layer calls backend ops (see `minasgd.backends`) and keeps what backward
needs from forward (its input, an argmax, ...). Layers with parameters get
*views* into the model's flat parameter and gradient vectors (`bind`), so the
whole model is one buffer to push, fetch and save. `backward` overwrites the
layer's gradient views (it does not accumulate) and returns the gradient with
respect to the layer's input.
"""

import numpy as np

from .kernels import shapes


class Layer:
    kind = "layer"
    param_shapes = {}  # name -> shape, in the order they sit in the flat vector

    def __init__(self, name):
        self.name = name
        self.in_shape = None  # per-image shape, set by `build`
        self.out_shape = None
        self.is_first = False  # the model's first layer need not compute a gradient for its input

    def build(self, in_shape):
        """Record the per-image input shape and return the output shape."""
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(self.output_shape(self.in_shape))
        return self.out_shape

    def bind(self, be, params, grads):
        """Attach the backend and this layer's views {name: array} into the flat vectors."""
        self.be, self.params, self.grads = be, params, grads

    def flops(self):
        """Multiply-adds count as 2 FLOPs; forward pass, one image."""
        return 0

    def describe(self):
        return {"name": self.name, "type": self.kind, "in_shape": list(self.in_shape), "out_shape": list(self.out_shape)}


class Conv2d(Layer):
    kind = "conv"

    def __init__(self, name, in_channels, out_channels, kernel, stride=1, pad=0):
        super().__init__(name)
        self.c, self.k, self.r, self.stride, self.pad = in_channels, out_channels, kernel, stride, pad
        self.param_shapes = {"w": (out_channels, in_channels, kernel, kernel), "b": (out_channels,)}

    def output_shape(self, in_shape):
        # one image (C, H, W) -> (K, P, Q): the backends' own formula and checks
        return shapes.conv2d_output_shape((1, *in_shape), self.param_shapes["w"], self.stride, self.pad)[1:]

    def forward(self, x, train):
        # x: (N, C, H, W) -> (N, K, P, Q)
        self.x = x
        return self.be.conv2d_forward(x, self.params["w"], self.params["b"], self.stride, self.pad)

    def backward(self, dy):
        # overwrites the weight/bias gradients; returns dx, or None for the network's first layer
        dx, dw, db = self.be.conv2d_backward(dy, self.x, self.params["w"], self.stride, self.pad,
                                             need_dx=not self.is_first)
        self.be.copy_into(self.grads["w"], dw)
        self.be.copy_into(self.grads["b"], db)
        return dx

    def flops(self):
        k, p, q = self.out_shape
        return 2 * k * p * q * self.c * self.r * self.r

    def describe(self):
        return {**super().describe(), "in_channels": self.c, "out_channels": self.k, "kernel": self.r,
                "stride": self.stride, "pad": self.pad, "params": self.k * self.c * self.r * self.r + self.k,
                "flops": self.flops()}


class MaxPool2d(Layer):
    kind = "maxpool"

    def __init__(self, name, size=3, stride=2):
        super().__init__(name)
        self.size, self.stride = size, stride

    def output_shape(self, in_shape):
        return shapes.pool2d_output_shape((1, *in_shape), self.size, self.stride)[1:]

    def forward(self, x, train):
        # x: (N, C, H, W) -> (N, C, P, Q); keeps the argmax for backward
        self.x_shape = x.shape
        y, self.argmax = self.be.maxpool2d_forward(x, self.size, self.stride)
        return y

    def backward(self, dy):
        return self.be.maxpool2d_backward(dy, self.argmax, self.x_shape, self.size, self.stride)

    def describe(self):
        return {**super().describe(), "kernel": self.size, "stride": self.stride, "params": 0, "flops": 0}


class ReLU(Layer):
    kind = "relu"

    def output_shape(self, in_shape):
        return in_shape

    def forward(self, x, train):
        self.y = self.be.relu_forward(x)
        return self.y

    def backward(self, dy):
        return self.be.relu_backward(dy, self.y)


class Dropout(Layer):
    """Inverted dropout; the mask comes from (seed, element index), so nothing is stored."""

    kind = "dropout"

    def __init__(self, name, p=0.5):
        super().__init__(name)
        self.p = p
        self.seed = 0  # set by the model before every training forward pass

    def output_shape(self, in_shape):
        return in_shape

    def forward(self, x, train):
        self.active = train and self.p > 0
        return self.be.dropout_forward(x, self.p, self.seed) if self.active else x

    def backward(self, dy):
        return self.be.dropout_backward(dy, self.p, self.seed) if self.active else dy

    def describe(self):
        return {**super().describe(), "p": self.p}


class Flatten(Layer):
    kind = "flatten"

    def output_shape(self, in_shape):
        return (int(np.prod(in_shape)),)

    def forward(self, x, train):
        self.x_shape = x.shape
        return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))

    def backward(self, dy):
        return dy.reshape(self.x_shape)


class Linear(Layer):
    kind = "fc"

    def __init__(self, name, in_features, out_features):
        super().__init__(name)
        self.d, self.m = in_features, out_features
        self.param_shapes = {"w": (out_features, in_features), "b": (out_features,)}

    def output_shape(self, in_shape):
        return shapes.linear_output_shape((1, *in_shape), self.param_shapes["w"])[1:]

    def forward(self, x, train):
        # x: (N, D) -> (N, M)
        self.x = x
        return self.be.linear_forward(x, self.params["w"], self.params["b"])

    def backward(self, dy):
        dx, dw, db = self.be.linear_backward(dy, self.x, self.params["w"])
        self.be.copy_into(self.grads["w"], dw)
        self.be.copy_into(self.grads["b"], db)
        return dx

    def flops(self):
        return 2 * self.d * self.m

    def describe(self):
        return {**super().describe(), "in_features": self.d, "out_features": self.m,
                "params": self.d * self.m + self.m, "flops": self.flops()}
