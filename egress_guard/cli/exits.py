"""Exit codes of every ``egress-guard`` command, defined once.

They are part of the interface: scripts and CI branch on them, so every command means
the same by each number.
"""

from __future__ import annotations

#: success: everything allowed, valid, verified
EXIT_OK = 0
#: the command ran and found something: a target blocked (``check``), a broken chain
#: (``audit verify``), an error finding (``doctor``), records lost at shutdown (``run``)
EXIT_FAIL = 1
#: the command could not do its job: bad arguments, an unreadable or invalid policy or
#: config, a file that cannot be written
EXIT_ERROR = 2
#: interrupted (Ctrl-C): 128 + SIGINT, as a shell reports it
EXIT_INTERRUPTED = 130
