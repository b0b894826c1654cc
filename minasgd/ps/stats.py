"""The parameter server's statistics: what the dashboard, metrics.jsonl and a worker's STATS see.

    numbers = server_stats(ps)                # everything, as plain JSON-able values
    reply = stats_reply(ps)                   # the answer to a worker's STATS: at most MAX_REPLY bytes

Both read the server's state under its lock (`ps.cond`) and copy it: nothing here changes it.
"""

import json
import time

MAX_REPLY = 48 * 1024  # bytes of a STATS reply (a control frame may carry protocol.MAX_JSON, 64 KiB)
REPLY_WORKERS = 32  # workers listed in a STATS reply


def server_stats(ps, max_workers=None):
    """Everything worth showing or keeping about `ps` (a ParameterServer), as plain JSON-able values.

    `max_workers`: list only the first this many workers (the reply to a worker's STATS, which
    must stay within a control frame's 64 KiB); `workers_listed` < `workers_total` then.
    """
    with ps.cond:
        return {
            "mode": ps.mode, "optimizer": ps.optimizer_name, "version": ps.version,
            "steps": ps.steps, "total_steps": ps.total_steps, "lr": ps.lr(), "done": ps.done,
            "pushes": ps.pushes, "fetches": ps.fetches, "rejected": ps.rejected,
            "discarded": ps.discarded, "checkpoints": ps.checkpoints,
            "checkpoint_failures": ps.checkpoint_failures, "checkpoint_error": ps.checkpoint_error,
            "staleness": ps.staleness.as_json(),
            "workers": ps.registry.listed(max_workers),
            "workers_total": ps.registry.total(), "departed_unlisted": ps.departed,
            "seconds": time.time() - ps.started,
        }


def stats_reply(ps):
    """The answer to a worker's STATS: `server_stats` with at most REPLY_WORKERS workers listed.
    Each entry is bounded (`registry.MAX_NAME`, `protocol.STATS_FIELDS`), so the reply stays under
    MAX_REPLY and a control frame's `protocol.MAX_JSON`; a histogram with very many staleness
    values is left out rather than overflow it."""
    reply = server_stats(ps, max_workers=REPLY_WORKERS)
    if len(json.dumps(reply)) > MAX_REPLY:
        reply["staleness"] = {}
    return reply
