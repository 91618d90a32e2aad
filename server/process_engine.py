"""The process engine: each model runs in a process of its own on this machine, and the
websocket front relays requests to it and answers back (``engine="process"``,
``hookwire serve --engine process``).

Why: in the embedded engine the front and the model worker share one interpreter lock, so a
tenant who keeps the front busy (large messages to copy and decode, handshakes, uploads)
takes that lock from every torch op of everyone's forward; SECURITY.md measured victims
spending 35-65 ms executing a 5 ms forward that way. Here the model process's interpreter
runs nothing but the worker and its own small loop.

The relay -- retries when a model process dies before answering, one ``done`` or ``error``
per request, per-user queue bounds -- is the Ray engine's (:class:`RelayEngine`); the model
process runs the Ray replica's code (server/process_replica.py). What crosses between the
two processes is described in server/process_link.py: JSON headers and raw bytes only, no
serialised Python object. A model process that dies is started again by the next request
that needs it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import queue
import socket
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass

from hookwire.errors import HookwireError, UnknownModel
from hookwire.server.job_payload import job_to_payload
from hookwire.server.process_link import (LinkClosed, items_of, pack, read_message,
                                          read_message_blocking, run_messages)
from hookwire.server.relay_engine import RelayEngine
from hookwire.server.worker import BATCH_WINDOW_S
from hookwire.validate import Limits

log = logging.getLogger("hookwire.server.process")

START_TIMEOUT_S = 900.0  # loading a large checkpoint from disk
STOP_TIMEOUT_S = 30.0


class ModelProcessLost(ConnectionError):
    """The model process died (or closed its link) while a request was in it."""


class ModelProcessFailed(HookwireError):
    """The model process could not load its model (at start-up, before serving)."""


@dataclass
class ProcessEntry:
    """What the front needs of a model held by a model process: its ``model_info`` answer."""
    info_json: str


class _Stream:
    """One request's answer from the model process, as the relay reads it: an async iterator
    of item lists, ended by the process's ``end``; ``cancel`` tells the process to stop."""

    def __init__(self, process: "ModelProcess", sid: int):
        self.process, self.sid = process, sid
        self.queue: asyncio.Queue = asyncio.Queue()

    def __aiter__(self):
        return self

    async def __anext__(self) -> list:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.process.forget(self.sid, tell=True)


class ModelProcess:
    """One model's process and the two sockets to it. ``start`` launches it and waits for
    its ``info`` (blocking: call it off the event loop once serving); ``attach`` starts
    reading its answers on the front's loop. Writes go through one thread, in order, so a
    large upload is never copied on the loop."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.streams: dict[int, _Stream] = {}
        self.answers: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._outbox: queue.Queue = queue.Queue()
        self._reader_task: asyncio.Task | None = None
        self._to_child: socket.socket | None = None
        self._from_child: socket.socket | None = None
        self.alive = False

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> dict:
        to_child, child_in = socket.socketpair()
        child_out, from_child = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hookwire.server.process_replica",
                 str(child_in.fileno()), str(child_out.fileno())],
                stdin=subprocess.PIPE, pass_fds=(child_in.fileno(), child_out.fileno()))
        finally:
            child_in.close()
            child_out.close()
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(self.spec) + "\n").encode())
        self.proc.stdin.close()
        from_child.settimeout(START_TIMEOUT_S)
        try:
            header, _ = read_message_blocking(from_child)
        except (LinkClosed, OSError, ValueError) as exc:
            self._kill(to_child, from_child)
            raise ModelProcessFailed(f"the model process for {self.spec['model']!r} exited "
                                     f"before it was ready ({exc})") from None
        if header.get("op") != "info":
            self._kill(to_child, from_child)
            raise ModelProcessFailed(f"the model process for {self.spec['model']!r} could "
                                     f"not load it: {header.get('error')}")
        from_child.settimeout(None)
        self._to_child, self._from_child = to_child, from_child
        self.info = header
        self.alive = True
        threading.Thread(target=self._write_loop, args=(to_child, self._outbox),
                         name=f"hookwire-to-{header['name']}", daemon=True).start()
        return header

    async def attach(self) -> None:
        """Read the process's answers on this loop (once per started process)."""
        # (Keep the writer: a StreamWriter that is collected closes its transport.)
        reader, self._from_child_writer = await asyncio.open_connection(sock=self._from_child)
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop(reader))

    def stop(self) -> None:
        """Close the link (the process then stops its worker and exits) and wait for it."""
        self.alive = False
        self._outbox.put(None)
        if self.proc is not None:
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("model process %d did not stop; killing it", self.proc.pid)
                self.proc.kill()
                self.proc.wait()
        # The reader (on the front's loop) sees the link end and lets go of its socket.

    def _kill(self, *socks) -> None:
        for sock in socks:
            sock.close()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    # ---- requests -------------------------------------------------------------------------
    def open(self, payload: dict) -> _Stream:
        if not self.alive:
            raise ModelProcessLost(f"the model process for {self.spec['model']!r} is down")
        sid = next(self._ids)
        stream = _Stream(self, sid)
        self.streams[sid] = stream
        self._outbox.put(run_messages(sid, payload))
        return stream

    def forget(self, sid: int, tell: bool) -> None:
        if self.streams.pop(sid, None) is not None and tell and self.alive:
            self._outbox.put([pack({"op": "cancel", "sid": sid})])

    def ask_hook_mode_info(self, flags: list, timeout: float) -> str:
        """From a thread other than the loop's: ask the process, wait for its answer."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            qid = next(self._ids)
            self.answers[qid] = future
        if not self.alive:
            raise ModelProcessLost(f"the model process for {self.spec['model']!r} is down")
        self._outbox.put([pack({"op": "hook_mode_info", "qid": qid, "flags": list(flags)})])
        try:
            return future.result(timeout)
        finally:
            with self._lock:
                self.answers.pop(qid, None)

    # ---- the two directions ---------------------------------------------------------------
    @staticmethod
    def _write_loop(sock: socket.socket, outbox: queue.Queue) -> None:
        """Send what ``outbox`` brings (lists of messages; None: stop). A list of several
        messages -- a large request's chunks -- goes one message at a time, taking turns with
        the others in progress, and a single message goes as soon as it is taken: one
        tenant's large upload never holds the link for the others' requests and cancels."""
        transfers: deque = deque()  # iterators over the messages still to send
        try:
            while True:
                try:
                    entry = outbox.get(block=not transfers)
                except queue.Empty:
                    entry = ()
                if entry is None:
                    break
                if len(entry) == 1:
                    for part in entry[0]:
                        sock.sendall(part)
                elif entry:
                    transfers.append(iter(entry))
                if transfers:  # (one message of a transfer per turn, however many come)
                    messages = transfers.popleft()
                    message = next(messages, None)
                    if message is not None:
                        for part in message:
                            sock.sendall(part)
                        transfers.append(messages)
        except OSError:
            pass  # the process is gone: the reader notices and fails what was open
        finally:
            sock.close()

    async def _read_loop(self, reader) -> None:
        try:
            while True:
                header, body = await read_message(reader)
                op = header["op"]
                if op == "items":
                    stream = self.streams.get(header["sid"])
                    if stream is not None:
                        stream.queue.put_nowait(items_of(header, body))
                elif op == "end":
                    stream = self.streams.pop(header["sid"], None)
                    if stream is not None:
                        stream.queue.put_nowait(None)
                elif op == "answer":
                    with self._lock:
                        future = self.answers.get(header["qid"])
                    if future is not None and not future.done():
                        future.set_result(header["text"])
        except LinkClosed:
            pass
        except Exception:  # a bug of ours: the link cannot be trusted any more
            log.exception("reading from the model process failed")
        finally:
            self._lost()

    def _lost(self) -> None:
        was_alive, self.alive = self.alive, False
        if was_alive:
            code = self.proc.poll() if self.proc is not None else None
            log.warning("the model process for %r stopped (exit status %s)",
                        self.spec["model"], code)
            self._outbox.put(None)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.queue.put_nowait(ModelProcessLost(
                f"the model process for {self.spec['model']!r} stopped"))
        with self._lock:
            answers, self.answers = self.answers, {}
        for future in answers.values():
            if not future.done():
                future.set_exception(ModelProcessLost("the model process stopped"))


class ProcessEngine(RelayEngine):
    """The process engine: the seam of :class:`~hookwire.server.worker.ModelWorker` with each
    model in a process of its own (see the module docstring). At construction it starts one
    model process per model spec (a built-in name or a checkpoint path, loaded there with
    ``device_map``/``dtype``/``device``; torch gets ``threads`` CPU threads there, by default
    one core fewer than the machine has) and waits until each has loaded its model. A model
    process that dies is started again by the next request for its model; requests that were
    in it are sent again if nothing of their answer had reached the client
    (:class:`RelayEngine`)."""

    RETRYABLE = (ModelProcessLost,)
    # One model process serves everyone, and a request that was in it when it died may be
    # what killed it: sent again once only, so no request can restart the model (and lose
    # everyone else's requests in flight) more than twice.
    max_attempts = 2

    def __init__(self, models: list[str], limits: Limits | None = None,
                 batching: bool = True, window_s: float = BATCH_WINDOW_S,
                 device_map=None, dtype=None, device=None, threads: int | None = None):
        self._init_relay(limits, batching)
        self.may_join = None  # set by the front: whether a batch mate could still come
        self.processes: dict[str, ModelProcess] = {}
        self._restarting: dict[str, asyncio.Lock] = {}
        self.restarts = 0
        try:
            for spec in models:
                process = ModelProcess({
                    "model": spec, "limits": dataclasses.asdict(self.limits),
                    "batching": batching, "window_s": window_s, "device_map": device_map,
                    "dtype": dtype, "device": device, "threads": threads})
                info = process.start()
                self.processes[info["name"]] = process
                self.entries[info["name"]] = ProcessEntry(info["info_json"])
        except BaseException:
            self._teardown()
            raise

    def start(self) -> None:
        super().start()
        loop = asyncio.get_running_loop()  # the front calls this on its loop
        for process in self.processes.values():
            loop.create_task(process.attach())

    def describe(self) -> dict:
        return {"kind": "process", "pids": {name: p.proc.pid for name, p in
                                            self.processes.items() if p.proc is not None},
                "restarts": self.restarts, "retried": self.retried}

    def submit(self, job) -> int:
        may_join = self.may_join
        # Whether another connection could still send a batch mate, as the front sees it now
        # (the model process's batch window ends at once when none could).
        job.mates_possible = True if may_join is None else bool(may_join([job]))
        return super().submit(job)

    def hook_mode_info(self, model: str, tl_flags) -> str:
        process = self.processes.get(model)
        if process is None:
            raise UnknownModel(f"model {model!r} is not served here; served: "
                               f"{', '.join(self.entries)}")
        return process.ask_hook_mode_info(list(tl_flags), START_TIMEOUT_S)

    def _payload_of(self, job) -> dict:
        # The writer thread sends the tensors' bytes straight from the tensors (no copy);
        # the submit goes as bytes (encoded here, in the executor, not on the loop).
        payload = job_to_payload(job, copy=False)
        if isinstance(payload["submit"], str):
            payload["submit"] = payload["submit"].encode()
        return payload

    async def _open_stream(self, model: str, payload: dict):
        process = self.processes[model]
        if not process.alive and not self._closing:
            lock = self._restarting.setdefault(model, asyncio.Lock())
            async with lock:
                if not self.processes[model].alive:
                    await self._restart(model)
        return self.processes[model].open(payload)

    async def _restart(self, model: str) -> None:
        old = self.processes[model]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, old.stop)
        fresh = ModelProcess(old.spec)
        try:
            await loop.run_in_executor(None, fresh.start)
        except HookwireError:
            raise ModelProcessLost(f"the model process for {model!r} could not be started "
                                   "again") from None
        await fresh.attach()
        self.processes[model] = fresh
        self.restarts += 1
        log.warning("started the model process for %r again (pid %d)", model, fresh.proc.pid)

    def _teardown(self) -> None:
        for process in self.processes.values():
            try:
                process.stop()
            except Exception:
                log.exception("stopping a model process")


__all__ = ["ProcessEngine", "ModelProcess", "ModelProcessLost", "ProcessEntry"]
