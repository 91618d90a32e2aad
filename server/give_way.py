"""Long requests give way to short ones that wait behind them.

The worker runs one batch at a time. A co-tenant's maximal request (a 10,000-node graph to
validate, a chain of large ops after its forward) may take up to ``max_request_seconds``, and a
small request that arrives meanwhile would wait all of it (a victim's 10 ms request took 460 ms
at p99 under such a tenant). But much of a long request's time is spent where the model is not
in use: validating and inferring shapes before its forward, and running the nodes that come
after it (reading the logits). There, at each node, :class:`GiveWay` lets whatever *light*
requests of other users wait run first -- a whole batch of them, on the same thread, as the
worker would run them -- then the long request goes on, its own clock paused for that time so
its deadline counts only its own work.

A forward gives way too (``in_forward``): between two of its blocks (the worker's stop check at
each block's pre-hook calls ``give_way(at_block=True)``; a forward reading HF module sites, in
the plain HF tree that mirrors the model's parameters, there and after each block's attention
module, ``ModelEntry.hf_attention_points``), inside each TL attention once its scores, its
pattern and its output are made (the same check, after those hook points:
``ModelEntry.attention_sites``; attention is most of a long sequence's block: a 28x256 tiny-gpt2
block took ~50 ms, ~35 of them up to the pattern), and at those of its own sites that are hook
points of a block itself or those attention points (``block_sites``), before each node its graph
runs there (a graph running thousands of nodes at one site, say). The light requests run as
forwards nested in it, on the same thread -- every served family's forward is re-entrant at a
block boundary, at a block's own hook points and at those attention points (experiments over all
served families, SECURITY.md; not at every hook point inside a component: TL's OPT MLP bridge
keeps per-call state on itself) -- with hooks owned per forward (``module_sites.owned_by``: the
interrupted forward's hooks stay silent in the nested ones) and its TL hook marks taken off the
model meanwhile. The worker allows it only when nothing else of the request's own is in effect
on the model (``ModelWorker._forward_may_give_way``). A batched forward gives way the same way
between its blocks (never at a site: one hook per site serves every member there) when each
member's forward could alone, with every member's TL hook marks taken off
(``ModelWorker._batch_may_give_way``): otherwise a tenant splitting its largest forward into
requests that co-batch would make the worker run it whole while others wait.

A generation gives way between two of its tokens (``server/generation.py``): its KV cache is its
own and none of its hooks is on the model there, so a light request runs as any forward.

Bounds: a batch gives way only after it has run ``QUANTUM_S`` since it began (``begin``: the
worker calls it as each batch starts; the quantum counts the batch, not each of its phases, so a
batch of many short-phased costly members -- each materialising a large resident view, say --
still gives way every quantum), and after giving way for T seconds it runs at least max(T,
``QUANTUM_S``) before it gives way again: it keeps at least half of the worker's time while it
runs, however much others queue (a tenant flooding light-looking but costly requests cannot
starve it). It gives way only to requests that are light before they are even validated (few
nodes, few tokens, small uploads, no generation) and, in a forward, of no more positions than
that forward (a small forward that has run a quantum must not wait inside itself for a larger
one). Light-looking is told before validation; one node can still be a long op (up to
``max_node_seconds``), so a request taken is validated first and, if its ops are estimated over
the worker's ``IN_PLACE_SECONDS`` (or it is heavy in bytes, flops or nodes), it does not run in
the other's place: it stays validated and is scheduled as any request is
(``ModelWorker.execute_in_place``: back at the head of its user's queue, validated), and its
user's later requests wait behind it. Requests of the long request's own user never overtake it
(each user's requests keep their order), and a request run in its place never gives way itself
(one level of nesting at most). And a batch the scheduler formed runs its light-looking requests
first, validated and run, before it validates the others (``ModelWorker.execute_batch``): a
light request taken into a batch with long ones is no longer in the queue to be found at a yield
point.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

from hookwire.module_sites import owned_by

log = logging.getLogger("hookwire.server")

LIGHT_NODES = 256          # a request with more nodes is not run in another's place
LIGHT_TOKENS = 4096        # nor one with more tokens (batch x sequence)
LIGHT_BYTES = 1 << 20      # nor one with more uploaded bytes or any resident reference


class GiveWay:
    """The worker's yield points. ``allowed(user)`` marks a phase of one request in which
    the model is not in use; calling the object there (the worker does, before every node)
    runs waiting light requests of other users if the quantum is up, and returns how many
    seconds that took (to be added to the request's clock)."""
    QUANTUM_S = 0.005

    def __init__(self, worker, rows, tokens):
        self.worker = worker
        self._rows, self._tokens = rows, tokens
        self._users = None      # whose phase allows giving way now (None: no phase)
        self._next_at = 0.0     # when the running batch may give way next
        self._running = False   # light requests are running in another's place
        self._suspend = None    # what the forward must take off the model meanwhile
        self._at_site_ok = None  # in a forward: may it give way at the node running now?
        self._forward_tokens = None  # in a forward: its positions (None: not in a forward)

    def begin(self) -> None:
        """A batch starts: it may give way once it has run one quantum."""
        self._next_at = time.perf_counter() + self.QUANTUM_S

    @contextlib.contextmanager
    def allowed(self, user: str):
        """A phase of ``user``'s request in which the model is not in use."""
        with self._phase({user}, None):
            yield

    @contextlib.contextmanager
    def in_forward(self, users, suspend, at_site_ok: Callable[[], bool], tokens: int):
        """A forward of ``users``' requests, ``tokens`` positions in all, that may give way
        between two of its blocks, and at a site where ``at_site_ok()`` says so: the light
        requests run as forwards nested in it (every served family's forward is re-entrant
        there), with hooks owned per forward (``module_sites.owned_by``), and ``suspend()``
        taking the interrupted request's own model state (its TL hook marks) off the model
        while they run. Only requests of at most ``tokens`` positions run in its place: a
        small forward never waits for a larger one it would otherwise have gone before."""
        with self._phase(set(users), suspend, at_site_ok, tokens):
            yield

    @contextlib.contextmanager
    def _phase(self, users, suspend, at_site_ok=None, tokens=None):
        outer = self._users, self._suspend, self._at_site_ok, self._forward_tokens
        self._users, self._suspend, self._at_site_ok = users, suspend, at_site_ok
        self._forward_tokens = tokens
        try:
            yield
        finally:
            self._users, self._suspend, self._at_site_ok, self._forward_tokens = outer

    def light(self, job) -> bool:
        """Cheap to run, told before validation: may run in a long request's place (in a
        forward: one of no more positions than that forward's)."""
        return self.looks_light(job) and job.conn.user not in (self._users or ()) and \
            (self._forward_tokens is None or self._tokens(job) <= self._forward_tokens)

    def looks_light(self, job) -> bool:
        """Few nodes, few tokens, small uploads, no references, no generation."""
        return job.prepared is None and job.submit.generate is None and \
            len(job.submit.graph.nodes) <= LIGHT_NODES \
            and self._tokens(job) <= LIGHT_TOKENS and job.received_bytes <= LIGHT_BYTES \
            and not job.refs

    def __call__(self, at_block: bool = False) -> float:
        if self._users is None or self._running or \
                (self._at_site_ok is not None and not at_block and not self._at_site_ok()):
            return 0.0
        now = time.perf_counter()
        if now < self._next_at:
            return 0.0
        worker = self.worker
        key = worker.batch_key if worker.batching else (lambda job: None)
        jobs = worker.scheduler.take_now(self.light, key, self._rows, self._tokens,
                                         worker.batch_fits)
        if not jobs:
            self._next_at = now + self.QUANTUM_S  # look again one quantum later
            return 0.0
        self._running = True
        outer = worker.current
        worker.current = outer + jobs
        suspended = self._suspend() if self._suspend is not None else contextlib.nullcontext()
        try:
            with suspended, owned_by(object()):
                worker.execute_in_place(jobs)
        except Exception:  # a bug of ours must not fail the request that gave way
            log.exception("batch run in another request's place failed")
        finally:
            worker.current = outer
            ran = [job for job in jobs if job.prepared is None]  # (the rest: put back)
            for job in ran:
                job.finish()
            worker.scheduler.finished({job.conn.user for job in ran})
            self._running = False
        end = time.perf_counter()
        self._next_at = end + max(end - now, self.QUANTUM_S)  # its own turn, at least as long
        return end - now


__all__ = ["GiveWay", "LIGHT_NODES", "LIGHT_TOKENS", "LIGHT_BYTES"]
