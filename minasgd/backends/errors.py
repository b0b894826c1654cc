"""The backends' error type, in a module of its own so that the CUDA backend can raise it
without importing the package that imports it (no cycle)."""


class BackendError(RuntimeError):
    """A backend that cannot run here (e.g. cuda without a GPU); the message is one line."""
