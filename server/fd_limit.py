"""Enough file descriptors for the connections the server's limits allow.

The connection caps (``Limits.max_connections``, ``max_handshakes``; server/connection_gate.py)
protect everyone only if the process can hold that many sockets. Many systems start a
process with a soft limit of 1,024 descriptors: a server at its default caps (1,024
connections and 512 handshakes) would run out first, and asyncio, failing to accept, stops
accepting for a second at a time -- nobody could connect, whoever held the sockets. So a
server raises its soft limit (up to the hard limit, which an unprivileged process may do) to
what its caps need, and says so in the log when the hard limit is lower.
"""
from __future__ import annotations

import logging

log = logging.getLogger("hookwire.server")

# Descriptors besides connections: the listening socket, model files, pipes to engine
# processes, the interpreter's own.
SPARE_DESCRIPTORS = 256


def ensure_file_descriptors(connections: int) -> int | None:
    """Raise this process's soft limit on open files to ``connections`` plus
    ``SPARE_DESCRIPTORS`` where it is lower (never above the hard limit; never lowered).
    Returns the soft limit now, or None where the platform has no such limit."""
    try:
        import resource
    except ImportError:  # (not on Windows)
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections + SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError) as exc:
                log.warning("could not raise the limit on open files from %d to %d: %s",
                            soft, target, exc)
        if soft < needed:
            log.warning("this process may open %d files; the server's limits allow %d "
                        "connections (max_connections + max_handshakes) and it needs ~%d "
                        "more: raise the hard limit (ulimit -Hn) or lower max_connections",
                        soft, connections, SPARE_DESCRIPTORS)
    return soft
