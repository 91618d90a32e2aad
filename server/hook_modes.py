"""Answering ``model_info`` with TL hook switches on, at the front.

Such a request asks how a model's TL sites fire with some of TL's ``set_use_*`` switches on.
The engine finds out by probing the model once per combination (it runs a forward, holding
the model: ``ModelWorker.hook_mode``; on the process and Ray engines a round trip to the
model's process). Before, every such request -- probed already or not -- took a thread of
the event loop's shared executor and waited there for the model: for the running batch on
the embedded engine (the cached answer was read under the model's lock), for the model
process's answer on the others. A tenant sending them at full rate beside a long request
held every thread of that executor (which the process and Ray engines also copy co-tenants'
requests in) and queued tasks without bound (SECURITY.md, *model_info probes*).

:class:`HookModeAnswers` keeps each combination's answer once it is known (it never
changes: the model and its sites are fixed; a combination TL refuses stays refused) and
answers from it on the loop. A combination not known yet is probed once, however many ask
(they share the probe), in a pool of its own. Each connection has at most
``MAX_PENDING_PER_CONNECTION`` of them unanswered, answered in the order asked; more is a
``QueueFull``.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from hookwire.errors import GraphValidationError, HookwireError, QueueFull
from hookwire.ir import hook_mode
from hookwire.server.session import error_text

MAX_PENDING_PER_CONNECTION = 4
PROBE_THREADS = 2


class HookModeAnswers:
    """The front's answers to ``model_info`` with TL hook switches: ``ask(state, msg)`` on
    the loop; ``probe(model, flags)`` (the engine's ``hook_mode_info``, blocking) runs in
    a pool of its own for combinations not answered yet."""

    def __init__(self, probe: Callable[[str, tuple], str] | None):
        self.probe = probe
        self.known: dict[tuple[str, str], str] = {}   # (model, switches) -> the answer
        self._probing: dict[tuple[str, str], asyncio.Future] = {}
        self._pool = ThreadPoolExecutor(PROBE_THREADS, thread_name_prefix="hookwire-probe")
        self._tasks: set = set()

    def ask(self, state, msg) -> None:
        """Answer ``msg`` (a ``ModelInfoRequest`` with ``tl_flags``) on ``state``'s outbox:
        at once when its answer is known and nothing of the connection's is pending, else
        after what the connection asked before."""
        key = (msg.model, hook_mode(msg.tl_flags))
        pending = getattr(state, "probes_pending", 0)
        if not pending and key in self.known:
            state.put_text(self.known[key])
            return
        if pending >= MAX_PENDING_PER_CONNECTION:
            state.put_text(error_text(QueueFull(
                f"{pending} model_info requests with TL hook switches are unanswered on this "
                "connection; wait for their answers", rule="model_info_pending")))
            return
        state.probes_pending = pending + 1
        task = asyncio.get_running_loop().create_task(
            self._answer(state, msg, key, getattr(state, "last_probe", None)))
        state.last_probe = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, state, msg, key, before) -> None:
        try:
            if before is not None and not before.done():
                await asyncio.wait({before})  # answers go out in the order asked
            answer = self.known.get(key)
            if answer is None:
                answer = await self._probe_once(msg, key)
            state.put_text(answer)
        finally:
            state.probes_pending -= 1

    async def _probe_once(self, msg, key) -> str:
        future = self._probing.get(key)
        if future is None:
            if self.probe is None:
                return error_text(HookwireError(
                    "this server's engine does not serve TL hook switches"))
            future = asyncio.get_running_loop().run_in_executor(
                self._pool, self.probe, msg.model, tuple(msg.tl_flags))
            self._probing[key] = future
            future.add_done_callback(lambda _: self._probing.pop(key, None))
        try:
            answer = await asyncio.shield(future)
        except GraphValidationError as exc:  # TL refuses the combination: it always will
            answer = error_text(exc)
        except Exception as exc:  # (an engine that could not ask now: not kept)
            return error_text(exc)
        self.known[key] = answer
        return answer

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["HookModeAnswers", "MAX_PENDING_PER_CONNECTION", "PROBE_THREADS"]
