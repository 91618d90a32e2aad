"""One remote call, from a traced graph to the user's objects: the pipeline every front shares.

Once a front has traced the user's code into a graph (TL 4 and TL 2.x ``run_with_hooks``,
hf's ``run_with_hooks`` / ``generate``, pyvene's call), what is left is the same every time:

1. **keep what escaped**: every proxy the user's code still holds after tracing (a cache
   entry, a list item, a closure variable) is saved as ``__escaped_<k>`` and remembered in a
   :class:`Destinations` -- the saved-value name that will replace it;
2. **submit** the graph and its tensors on a connection, with a progress bar
   (:class:`hookwire.progress.ProgressBar`), blocking or inside a ``blocking=False``
   :class:`hookwire.runs.RemoteRun`, whose ``events()`` then carry the server's messages;
3. **stream**: each saved value is handed over the moment its last byte arrives; a
   non-blocking run that announces values (:class:`hookwire.runs.SavedValue`) puts each one
   in place before announcing it;
4. **rebind** (:func:`hookwire.rebind.rebind`): the real tensors replace the proxies wherever
   the user's code stored them. After a failure, the values that arrived before it are put
   in place too (as a local run that fails half-way keeps what its hooks stored), and the
   traces are closed: a proxy that never got a value refuses to be used.

:class:`RemoteCall` does 2-4; :class:`Destinations` is 1. What differs per front -- how the
user's code is traced, which inputs travel with the graph, what the call returns -- stays in
the adapter: it builds the graph, fills the destinations, and reads its return value from the
:class:`hookwire.client.RunResult` that :meth:`RemoteCall.send` returns.

::

    tracer = Tracer(); ...trace the user's hooks on proxies...
    destinations = Destinations.keep_escaped(tracer)
    graph, tensors = ...the adapter's request...
    result = RemoteCall(model, graph, tensors, destinations=destinations,
                        tracers=[tracer]).send(get_connection(url, key))
    return result.values["__logits__"]
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from hookwire.aliases import plan_aliases
from hookwire.progress import ProgressBar
from hookwire.rebind import rebind
from hookwire.runs import RemoteRun, SavedValue

ESCAPED_PREFIX = "__escaped_"


def escaped_name(k: int) -> str:
    """The saved-value name of the k-th value that escaped a trace."""
    return f"{ESCAPED_PREFIX}{k}"


class _Entry:
    """A proxy waiting for a value, and the views that make its tensor from the value. (An
    object of a hookwire class, not a tuple: :func:`hookwire.rebind.rebind` leaves those
    alone, where a tuple holding a proxy would cost it one more heap walk.)"""
    __slots__ = ("proxy", "views")

    def __init__(self, proxy, views):
        self.proxy, self.views = proxy, views


class Destinations:
    """Where the values a request saves go: for each saved-value name, the proxies (held by
    the user's code) that the value replaces, each with the views that make its tensor from
    the value (:mod:`hookwire.aliases`: values that are views of one another travel once).

    How the final rebind searches (see :func:`hookwire.rebind.rebind`): ``roots`` are where
    the user's code can reach (hook functions, hook points), searched first; ``expected`` (id -> references the user's code holds, as
    :meth:`hookwire.trace.Tracer.escaped` counted them) says when that search is complete;
    ``opaque`` types are never searched through; ``skip`` lists containers of the caller's
    own that must be left alone."""

    def __init__(self, *, roots=(), expected: dict | None = None, opaque: tuple = (),
                 skip: tuple = ()):
        self._by_name: dict[str, list[_Entry]] = {}
        self.roots = roots
        self.expected = expected
        self.opaque = opaque
        self.skip = skip

    @classmethod
    def keep_escaped(cls, tracer, *, exclude_ids=(), share_views: bool = False,
                     **search) -> "Destinations":
        """Save every proxy that escaped ``tracer`` (``__escaped_<k>``) and remember where
        each goes. ``share_views``: values that are whole views of one another locally (a
        cache keyed by every alias of a hook point) travel once; the client makes the views.
        ``search``: the rebind's ``roots`` / ``opaque`` / ``skip``; ``expected`` is the
        tracer's own count of user references."""
        escaped = tracer.escaped(exclude_ids=exclude_ids)
        out = cls(expected=tracer.user_refs, **search)
        if not share_views:
            for k, proxy in enumerate(escaped):
                tracer.save(escaped_name(k), proxy)
                out.add(escaped_name(k), proxy)
            return out
        plan = plan_aliases(escaped)
        for k, root in enumerate(plan.roots):
            tracer.save(escaped_name(k), root)
            for index, views in plan.members[k]:
                out.add(escaped_name(k), escaped[index], views)
        return out

    def add(self, name: str, proxy, views=()) -> None:
        """The value saved as ``name`` replaces ``proxy`` (after ``views``, innermost first:
        they are applied last to first)."""
        self._by_name.setdefault(name, []).append(_Entry(proxy, list(views)))

    def add_all(self, proxies, name: Callable[[int], str] = escaped_name) -> None:
        """``proxies[k]`` is replaced by the value saved as ``name(k)``."""
        for k, proxy in enumerate(proxies):
            self.add(name(k), proxy)

    def extend(self, other: "Destinations", rename: Callable[[str], str]) -> None:
        """Take ``other``'s entries, each under ``rename(name)`` (one request made of several
        traced graphs: a generation's step ``k`` saves ``name`` as ``"k/name"``)."""
        for name, entries in other._by_name.items():
            self._by_name.setdefault(rename(name), []).extend(entries)

    def proxies(self) -> list:
        """Every proxy waiting for a value, in the order they were added."""
        return [entry.proxy for entries in self._by_name.values() for entry in entries]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_name.values())

    def names(self):
        return self._by_name.keys()

    def replacements(self, name: str, value: torch.Tensor, olds: list, news: list) -> None:
        """Append to ``olds`` every proxy the value saved as ``name`` replaces, and to
        ``news`` its tensor. (Two lists, not pairs: see :class:`_Entry`.)"""
        for entry in self._by_name.get(name, ()):
            made = value
            for replay in reversed(entry.views):
                made = replay(made)
            olds.append(entry.proxy)
            news.append(made)


class RemoteCall:
    """One traced request, from submit to the user's objects (steps 2-4 of the module
    docstring): submit ``graph`` with ``tensors`` for ``model`` on a connection, show its
    progress, stream its values, and put them where ``destinations`` says.

    ``tracers``: the traces the graph came from; closed if the call fails (their proxies
    never get a value and must not be used). ``n_sites``: the progress bar's total (the
    graph's sites by default). ``progress``: show a bar (None: when stderr is a terminal).
    ``submit_extra``: further fields of the submit message (a generate request).
    ``announce_values``: a non-blocking run's events include a :class:`SavedValue` per saved
    value (each put in place first); without it values are put in place at the end."""

    def __init__(self, model: str, graph: dict, tensors: dict, *,
                 destinations: Destinations | None = None, tracers=(),
                 n_sites: int | None = None, progress: bool | None = None,
                 submit_extra: dict | None = None, announce_values: bool = True):
        self.model, self.graph, self.tensors = model, graph, tensors
        self.destinations = destinations if destinations is not None else Destinations()
        self.tracers = list(tracers)
        self.n_sites = len(graph["sites"]) if n_sites is None else n_sites
        self.progress = progress
        self.submit_extra = submit_extra
        self.announce_values = announce_values

    def send(self, conn, run: RemoteRun | None = None,
             on_value: Callable[[str, torch.Tensor], None] | None = None):
        """Run the request on ``conn`` and rebind its values; returns the
        :class:`hookwire.client.RunResult`. ``run``: the ``blocking=False`` handle this call
        works for. ``on_value(name, value)``: the adapter's own use of each value as it
        arrives (a generated token), after it was put in place."""
        # The run that announces each value as it arrives (None: values go in place at the end).
        stream_to = run if self.announce_values else None
        streaming = stream_to is not None
        arrived_olds: list = []  # arrived, not yet in place (put there after a failure)
        arrived_news: list = []

        def value_arrived(name, value):
            if streaming:  # in place the moment it arrives, before its event is seen
                olds: list = []
                news: list = []
                self.destinations.replacements(name, value, olds, news)
                if olds:
                    rebind(olds, news)
            else:
                self.destinations.replacements(name, value, arrived_olds, arrived_news)
            if on_value is not None:
                on_value(name, value)
            if stream_to is not None:
                stream_to.emit(SavedValue(name, value))

        on_submit = None if run is None else (lambda request_id: run.submitted(conn,
                                                                                request_id))
        with ProgressBar(self.model, self.n_sites, self.progress) as bar:
            def event(msg):
                bar.on_event(msg)
                if run is not None:
                    run.emit(msg)
            try:
                result = conn.run(self.graph, self.tensors, on_event=event,
                                  on_value=value_arrived, on_submit=on_submit,
                                  submit_extra=self.submit_extra,
                                  progress=bar.shows or run is not None)
            except BaseException:
                # As after a local failure: what was stored before the failing point holds
                # its value; proxies stored later can never get one and refuse to be used.
                if arrived_olds:
                    rebind(arrived_olds, arrived_news)
                for tracer in self.tracers:
                    tracer.closed = True
                raise
        if not streaming:
            del arrived_olds[:], arrived_news[:]  # no holder of ours left for the heap walk
            self._rebind_all(result.values)
        return result

    def _rebind_all(self, values: dict) -> None:
        """Every value in place, searching where the user's code can reach first."""
        dest = self.destinations
        olds: list = []
        news: list = []
        for name in dest.names():
            if name in values:
                dest.replacements(name, values[name], olds, news)
        if not olds:
            return
        roots = tuple(dest.roots) if dest.expected is not None else ()
        rebind(olds, news, skip=dest.skip, roots=roots,
               expected=dest.expected if roots else None, opaque=dest.opaque)


def start_in_background(work: Callable[[RemoteRun], object], traced: threading.Event,
                        blocked_by: Callable[[], bool] | None = None) -> RemoteRun:
    """A ``blocking=False`` call: ``work(run)`` runs in a background thread; the caller
    waits only until ``traced`` is set, so trace errors still raise at the call, then gets
    the :class:`RemoteRun` handle. ``blocked_by``: see :attr:`RemoteRun.blocked_by`."""
    run = RemoteRun(work)
    run.blocked_by = blocked_by
    run.start()
    run.wait_until_traced(traced)
    return run


__all__ = ["RemoteCall", "Destinations", "start_in_background", "escaped_name",
           "ESCAPED_PREFIX"]
