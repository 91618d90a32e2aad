"""Connections before they are anyone's: TCP sockets still in the websocket opening handshake.

Everything the server counts per user (memory, the front's time, connections per API key)
starts once a handshake is through: only then is there a user. Before that, websockets holds
each socket open for up to ``open_timeout`` (10 s) and buffers the request as it arrives --
up to 128 header lines of 8 KiB each, ~1 MiB. A tenant who opens sockets and never finishes
their handshake (a "slowloris") grew a server by 2.1 GiB with 2,000 of them, held that many
file descriptors (a common limit is 1,024: nobody else could connect), and slowed an
established co-tenant's p99 32x (bench_fairness ``slow_handshakes``).

:class:`ConnectionGate` bounds that, before anything is paid, by the peer's *address* (the
only identity there is yet; IPv6 by /64, the block one host usually has):

- sockets in their handshake, in all (``Limits.max_handshakes``) and per address
  (``max_handshakes_per_address``): a socket over either is closed as it is accepted;
- bytes one handshake may send (``max_handshake_bytes``; a real request is under 1 KiB):
  over it, the socket is closed -- so handshakes hold at most
  ``max_handshakes x max_handshake_bytes`` of memory;
- connections that passed their handshake, per address (``max_connections_per_address``,
  ``None`` for none): over it the handshake is answered HTTP 429, as over an API key's cap.
  Keyless servers have no per-user cap, so without this one address could hold every one of
  ``max_connections``. Behind a reverse proxy every peer is the proxy: set it to ``None``
  there and let the proxy limit its clients.

:class:`Gatekeeper` is what ``serve`` builds for each accepted socket (``create_connection``):
it refuses or hands the socket to a :class:`GatedConnection`, the websockets connection that
reports to the gate. Refused sockets are aborted at once: a handshake that has
not arrived cannot be answered, and waiting for it is what the attacker wants. The client
reports that as :class:`~hookwire.errors.ServerUnavailable`.
"""
from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter

from websockets.asyncio.server import ServerConnection


def address_of(transport) -> str:
    """The peer's address as the gate counts it: an IPv4 address, an IPv6 /64, or
    ``"local"`` (a Unix socket, or a transport that does not say)."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not isinstance(peer, tuple) or not peer:
        return "local"
    try:
        ip = ipaddress.ip_address(peer[0])
    except ValueError:
        return str(peer[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class ConnectionGate:
    """Counts sockets by address and says which may go on (all on the event loop: no lock).

    ``handshaking`` and ``established`` are per-address counters; a socket is in at most one
    of them. Counting is paired: each ``enter_handshake`` that returned True is ended by one
    ``leave_handshake``, each ``admit`` that returned None by one ``release``."""

    def __init__(self, max_handshakes: int, max_handshakes_per_address: int,
                 max_handshake_bytes: int, max_connections_per_address: int | None):
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_address = max_handshakes_per_address
        self.max_handshake_bytes = max_handshake_bytes
        self.max_connections_per_address = max_connections_per_address
        self.handshaking: Counter = Counter()
        self.established: Counter = Counter()
        self.refused = 0  # sockets closed by the gate (for /health and tests)

    @property
    def handshakes(self) -> int:
        return sum(self.handshaking.values())

    def enter_handshake(self, address: str) -> bool:
        """A socket was accepted: may it start its handshake?"""
        if self.handshaking[address] >= self.max_handshakes_per_address \
                or self.handshakes >= self.max_handshakes:
            self.refused += 1
            return False
        self.handshaking[address] += 1
        return True

    def leave_handshake(self, address: str) -> None:
        self.handshaking[address] -= 1
        if self.handshaking[address] <= 0:
            del self.handshaking[address]

    def admit(self, address: str) -> str | None:
        """A handshake is about to be accepted: None (counted), or why it may not."""
        cap = self.max_connections_per_address
        if cap is not None and self.established[address] >= cap:
            return f"at most {cap} connections per client address"
        self.established[address] += 1
        return None

    def release(self, address: str) -> None:
        self.established[address] -= 1
        if self.established[address] <= 0:
            del self.established[address]


class Gatekeeper(asyncio.Protocol):
    """What websockets hands asyncio for each accepted socket (``serve``'s
    ``create_connection``: ``functools.partial(Gatekeeper, gate)``). A socket over the
    gate's caps is aborted here, before websockets builds a connection, a handler task or a
    parser for it (half the loop's cost of a refused socket); any other becomes a
    :class:`GatedConnection`, which takes the transport over."""

    def __init__(self, gate: ConnectionGate, *args, **kwargs):
        self.gate, self.args, self.kwargs = gate, args, kwargs

    def connection_made(self, transport) -> None:
        address = address_of(transport)
        if not self.gate.enter_handshake(address):
            transport.abort()
            return
        connection = GatedConnection(self.gate, address, *self.args, **self.kwargs)
        del self.args, self.kwargs
        transport.set_protocol(connection)
        connection.connection_made(transport)

    def connection_lost(self, exc) -> None:  # (a refused socket)
        pass


class GatedConnection(ServerConnection):
    """websockets' server connection, counted by a :class:`ConnectionGate`: it holds one of
    the gate's handshake slots until its handshake ends, is closed when the handshake sends
    more than ``max_handshake_bytes``, and is counted per address once ``process_request``
    admits it (:meth:`admit`)."""

    def __init__(self, gate: ConnectionGate, address: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.address = gate, address
        self.in_handshake = True  # holds one of the gate's handshake slots
        self.admitted = False  # counted in the gate's established connections
        self.handshake_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.in_handshake and self.request is None:  # (the request itself, not frames)
            self.handshake_bytes += len(data)
            if self.handshake_bytes > self.gate.max_handshake_bytes:
                self._end_handshake()
                self.transport.abort()  # before websockets buffers or parses any of it
                return
        super().data_received(data)

    def send_data(self) -> None:
        """websockets' ``send_data`` (what its protocol has to send, written to the socket,
        then the half-close when it is done), except that once the socket is going away what
        is left is dropped. A connection's reading is cut into slices
        (server/frame_budget.py), so a ping-flooding tenant that disconnects still had
        hundreds of pings parsed after its socket failed, and asyncio logged a warning for
        every pong written to it after the first failure (~1,200 lines a disconnect)."""
        for data in self.protocol.data_to_send():
            if self.transport.is_closing():
                continue
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                try:
                    self.transport.write_eof()
                except Exception:  # (as websockets: write_eof documents no exceptions)
                    pass
            else:
                self.transport.close()

    async def handshake(self, *args, **kwargs) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            self._end_handshake()

    def admit(self) -> str | None:
        """Count this connection as established (from ``process_request``): None, or why
        it is refused."""
        refusal = self.gate.admit(self.address)
        self.admitted = refusal is None
        return refusal

    def connection_lost(self, exc) -> None:
        self._end_handshake()
        if self.admitted:
            self.admitted = False
            self.gate.release(self.address)
        super().connection_lost(exc)

    def _end_handshake(self) -> None:
        if self.in_handshake:
            self.in_handshake = False
            self.gate.leave_handshake(self.address)
