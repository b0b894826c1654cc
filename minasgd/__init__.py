"""minasgd: GPU asynchronous SGD from scratch (Paine et al., 2013).

A NumPy reference backend and a Numba CUDA backend behind one op contract
(`minasgd.backends`), an AlexNet-like model whose parameters live in one flat
float32 vector (`minasgd.model`), datasets, a trainer, and a parameter server.
"""

__version__ = "0.1.0"
