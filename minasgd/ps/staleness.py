"""Staleness, counted in mini-batches, and its bounded histogram (no lock, no networking).

    clock = VersionClock(start_step=0)
    clock.remember(version=1, steps=4)          # after each update
    clock.staleness(base_version=0, version=1, steps=4)   # -> 4: mini-batches applied since version 0
    histogram = StalenessHistogram(); histogram[300] += 1  # counted under 256 (power-of-two buckets)

A push's staleness is the server's step count now minus its step count when the worker fetched
the parameters it computed from. A base version older than the server remembers (before a
resume, or STEPS_MEMORY versions back) counts from the oldest it does; the histogram counts
staleness exactly below EXACT_STALENESS and in power-of-two buckets above (`staleness_bucket`),
so no peer can grow metrics.jsonl or the checkpoint with new keys.
"""

import collections

STEPS_MEMORY = 100_000  # versions whose step count is kept for staleness (a worker older is capped)
EXACT_STALENESS = 128  # staleness values the histogram counts one by one; above, power-of-two buckets


def staleness_bucket(staleness):
    """The histogram key a staleness counts under: itself below EXACT_STALENESS, else the largest
    power of two not above it (128 counts 128..255, 256 counts 256..511, ...). So the histogram
    has at most ~180 keys, however stale a peer claims to be."""
    staleness = int(staleness)
    return staleness if staleness < EXACT_STALENESS else 1 << (staleness.bit_length() - 1)


class StalenessHistogram(collections.Counter):
    """staleness (mini-batches) -> pushes, bounded: `histogram[s] += 1` counts s in its bucket."""

    def __getitem__(self, staleness):
        return super().__getitem__(staleness_bucket(staleness))

    def __setitem__(self, staleness, count):
        super().__setitem__(staleness_bucket(staleness), count)

    def as_json(self):
        """{"staleness": pushes}, sorted: what stats, metrics.jsonl and the checkpoint keep."""
        return {str(k): v for k, v in sorted(self.items())}

    @classmethod
    def from_json(cls, counts):
        histogram = cls()
        for key, count in counts.items():
            histogram[int(key)] += count
        return histogram


class VersionClock:
    """version -> the server's step count then, for the last STEPS_MEMORY versions."""

    def __init__(self, version=0, steps=0):
        self.reset(version, steps)

    def reset(self, version, steps):
        """Start over at (version, steps): a resumed run remembers nothing older."""
        self.steps_at_version = {version: steps}
        self.first_version = version  # pushes based on older versions count from here

    def remember(self, version, steps):
        self.steps_at_version[version] = steps
        self.steps_at_version.pop(version - STEPS_MEMORY, None)

    def staleness(self, base_version, version, steps):
        """Mini-batches applied since a worker fetched `base_version` (never negative), the server
        being at `version` after `steps` mini-batches. A version older than remembered counts from
        the oldest remembered: capped, never a KeyError."""
        oldest = max(self.first_version, version - STEPS_MEMORY + 1)
        steps_then = self.steps_at_version.get(min(max(base_version, oldest), version))
        return max(0, steps - (steps if steps_then is None else steps_then))
