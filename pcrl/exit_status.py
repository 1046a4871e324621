"""The exit statuses of pcrl's commands, one name each (docs/failures.md lists what to do for each).

A status means the same thing in every command that uses it; ``REJECTS`` is the sharder's own.
"""

from __future__ import annotations

__all__ = [
    "BAD_DATA",
    "CHECKPOINT_WRITE",
    "FAILED",
    "INTERRUPTED",
    "NONFINITE",
    "OK",
    "PREEMPTED",
    "RANK_LOST",
    "REJECTS",
    "USAGE",
]

OK = 0
"""Done (or nothing left to do)."""
FAILED = 1
"""Something outside the user's input failed (a download, a worker process, an unreachable server); the
message names it and a rerun continues."""
USAGE = 2
"""A user mistake: a bad config key, command line or input, named in the message; nothing was started."""
NONFINITE = 3
"""Pretraining: the loss became non-finite (the step is named); no checkpoint of that step."""
REJECTS = 3
"""``data_prep.shard``: more than ``--max-reject-fraction`` of the inputs were rejected."""
BAD_DATA = 4
"""Pretraining: too many unreadable volumes (``data.bad_volumes``, ``data.max_bad_fraction``)."""
CHECKPOINT_WRITE = 5
"""Pretraining: a checkpoint could not be written (full disk, I/O error); the previous one is intact."""
PREEMPTED = 75
"""A preemption signal: a checkpoint was saved; relaunch the same command to continue (EX_TEMPFAIL: a
temporary failure, try again)."""
RANK_LOST = 76
"""The surviving ranks when another rank died or stopped answering (the message names it); relaunching
continues from the last checkpoint (launch/slurm/pretrain.sbatch requeues a few times)."""
INTERRUPTED = 130
"""Interrupted with Ctrl-C (128 + SIGINT); ``launch/tune.py --resume`` continues."""
