"""Moved: the one rendering module is `minasgd.dashboard`. This alias keeps
`from minasgd.progress import TrainProgress` working for the parameter server until it reports
through events (see tests/test_layering.py, ALLOWED)."""

from .dashboard import TrainProgress  # noqa: F401
