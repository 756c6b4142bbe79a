"""The audit log: a tamper-evident JSON Lines sink (DESIGN section 6).

One JSON object per line, append-only. Every line carries ``seq`` (its line number in the
chain, continuing across rotations and restarts) and ``prev``, the sha256 of the exact
bytes of the previous line (without its newline); the first line of a brand-new log
chains from 64 zeros. ``egress-guard audit verify`` recomputes the chain, so an edited,
deleted, inserted or reordered line breaks it at a named place.

What the chain does and does not prove: it is unkeyed, so it detects edits made by
someone who did not rewrite every later line as well, and it cannot detect lines cut off
the end of the newest file. Anchor it outside the machine when that matters: ship the
lines to a remote collector, or record ``AuditLog.head`` (the hash of the last line, also
printed by ``audit verify``) somewhere the agent cannot write.

Events (``event`` field)
    ``startup``        the sink opened: version, pid, policy_sha256 (when known), and
                       ``recovered: "torn_line"`` when the previous run left a partial line
    ``policy_loaded``  from PolicyEvent: result ok|error, source, policy_sha256, error
    ``decision``       from DecisionEvent: id, client, host, port, sni, method, path,
                       decision (allow|block|would_block), reason, destination, catalog
                       (the catalog entry covering an unlisted target), mode,
                       policy_sha256, detail, hint
    ``close``          from CloseEvent: the decision fields that apply, plus bytes_up,
                       bytes_down, duration_ms, error
    ``dropped``        events that could not be logged: count and reason (queue_full,
                       closed, encode_error). Written as soon as the writer can.

Never written: header values (Authorization, Proxy-Authorization, x-api-key, api-key,
cookies), bodies, query strings, path parameters, userinfo. The events do not carry
them; as a second line of defence (egress_guard/sinks/redact.py, docs/audit-log.md) ``path``
loses everything from the first ``?``, ``#`` or ``;`` or an encoding of one (``%3F``,
``%23``, ``%3B``, any case, ``%25``-encoded again) and the userinfo of an absolute URL,
``host`` and ``sni`` lose userinfo, and free-text fields get markers in place of
queries, parameters and userinfo.

Threading and back-pressure: one writer thread serialises, hashes, writes and fsyncs.
Decisions that let traffic through are *admitted*: ``await admit(event)`` queues the
record, wakes the writer at once, and returns True only once the line is written
(``os.write`` returned; with fsync ``always`` also after that batch's fsync), so the proxy
forwards nothing whose record is not in the file. The writer tells all admissions of a
batch with one ``call_soon_threadsafe``. False (the caller refuses the traffic) when the
log is unhealthy or shutting down, when the write fails (every admission not yet written
is told at once), or when there was no room or no write within ``admit_timeout``. A full
queue makes an admission wait for room (asynchronously), never drops it.

The other Sink methods (refusals, closes, policy loads: nothing waits for them) never
block and never raise for ordinary input. They do not wake the writer (that would hand
the GIL to it in the middle of the proxy's work); it looks for new records every 20 ms,
so such a record reaches the file within about 20 ms (after a quiet second the writer
sleeps until the next record wakes it). Past a full queue they go to an overflow list
(``overflow_size``), in order; while it holds anything, new records and admissions queue
behind it. Only when that is full too is a record *counted* as lost, and ``healthy``
turns False at once: the proxy refuses new connections and requests (reason
internal_error) instead of letting traffic through unrecorded. The loss is written into
the chain as a ``dropped`` line when the writer catches up, after which the sink is
healthy again. Nothing is dropped silently.

Write failures (permission, disk full, any OSError): ``healthy`` turns False, the failure
is printed on stderr once per episode, ``write_errors`` counts every failed attempt, and
the writer retries every ``retry_interval`` seconds. Bytes already committed to the chain
are kept and written on recovery (a short write resumes where it stopped), so a recovered
log still verifies. While it fails the writer stops taking events off the queue, so
memory stays bounded; overflow is counted as above.

fsync: ``always`` (after every batch the writer writes: a machine crash loses at most the
events in flight, and no admitted one), ``interval`` (default: at most every
``fsync_interval`` seconds while there is unsynced data), ``never`` (leave it to the OS; a
proxy crash still loses nothing that reached the writer, a machine crash may).

Rotation by size: when the next line would take ``audit.log`` past ``max_bytes`` it is
renamed ``audit.log.1`` (``.1`` -> ``.2`` ..., keeping ``backups`` files) and a new file
started. The chain runs on across files. On restart the sink reads the last line of the
existing file (or of ``.1`` if the current file is empty) and chains from it; it never
rewrites a byte. A partial last line left by a crash is sealed with a newline and named in
the next ``startup`` line, which verify reports as a note rather than tampering.

One process per file: the sink takes an exclusive ``flock`` on the file it appends to,
and a second guard pointed at the same file stays unhealthy (two writers would fork the
chain). Rotation is the sink's own; an external logrotate would cut the chain.

Path ``-`` writes to standard output (container log pipelines): no rotation, no fsync,
and each process start begins a new chain from 64 zeros.

Lifecycle: the Sink method ``close(event)`` records a CloseEvent (the protocol's name);
shutting the log down is ``shutdown()``: it writes everything queued, retrying a failing
write until its timeout. ``flush()`` waits until everything queued so far
is written and synced. An ``atexit`` hook shuts the log down at interpreter exit.

Modules: ``record`` (each event's fields and their redaction), ``chain`` (line hashes,
where an existing log leaves the chain), ``handoff`` (queue and admission verdicts between
the event loop and the writer), ``files`` (open, lock, write, sync, rotate), ``writer``
(``AuditLog``, the sink). The readers: ``read`` (lines and records of a rotated set),
``verify`` (the chain check), ``summary`` and ``learn`` (``egress-guard audit ...``).
"""

from egress_guard.sinks.audit.chain import GENESIS, Tail, line_hash, read_tail
from egress_guard.sinks.audit.record import rfc3339, scrub_host, scrub_path, scrub_text
from egress_guard.sinks.audit.writer import (
    DEFAULT_ADMIT_TIMEOUT,
    DEFAULT_BACKUPS,
    DEFAULT_MAX_BYTES,
    DEFAULT_OVERFLOW_SIZE,
    DEFAULT_QUEUE_SIZE,
    FSYNC_POLICIES,
    AuditLog,
    FsyncPolicy,
)

__all__ = [
    "DEFAULT_ADMIT_TIMEOUT",
    "DEFAULT_BACKUPS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_OVERFLOW_SIZE",
    "DEFAULT_QUEUE_SIZE",
    "FSYNC_POLICIES",
    "GENESIS",
    "AuditLog",
    "FsyncPolicy",
    "Tail",
    "line_hash",
    "read_tail",
    "rfc3339",
    "scrub_host",
    "scrub_path",
    "scrub_text",
]
