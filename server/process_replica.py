"""A model process of the process engine: ``python -m hookwire.server.process_replica IN OUT``.

It loads one model and runs the same replica as a Ray Serve replica does
(:class:`~hookwire.server.ray_replica.ModelReplica`: the ``ModelWorker`` with its executor,
batching and give-way), but talks to the front over two inherited sockets instead of Ray:
``IN`` brings ``run``/``cancel``/``hook_mode_info`` messages, ``OUT`` takes the answers
(server/process_link.py). What to load comes as one JSON line on stdin, written by the
front that started this process. The process lives until ``IN`` closes (the front stopped,
or died).

Why a process: the front (websocket I/O, parsing, handshakes, other tenants' uploads) and
the model worker no longer share one interpreter lock, so a tenant who keeps the front busy
no longer slows every torch op of everyone's forward.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys

from hookwire.server import replies
from hookwire.server.process_link import (LinkClosed, RunAssembly, items_messages, pack,
                                          payload_of_run, read_message)

log = logging.getLogger("hookwire.server.process")


class ReplicaLink:
    """The model process's side of the link: one task per running request, each streaming
    what its request's replica generator yields as ``items`` messages, then ``end``."""

    def __init__(self, replica, reader, writer):
        self.replica, self.reader, self.writer = replica, reader, writer
        self.running: dict[int, asyncio.Task] = {}
        self.arriving: dict[int, RunAssembly] = {}  # chunked runs whose data is on its way

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                header, body = await read_message(self.reader)
            except LinkClosed:
                return
            op = header["op"]
            if op == "run" and header.get("chunked"):
                self.arriving[int(header["sid"])] = RunAssembly(header)
            elif op == "run":
                sid = int(header["sid"])
                self.running[sid] = loop.create_task(self._stream(sid, header, body))
            elif op == "data":
                sid = int(header["sid"])
                assembly = self.arriving.get(sid)
                if assembly is not None and assembly.add(body):
                    del self.arriving[sid]
                    self.running[sid] = loop.create_task(
                        self._stream(sid, assembly.header, memoryview(assembly.body)))
            elif op == "cancel":
                sid = int(header["sid"])
                self.arriving.pop(sid, None)  # (its remaining data is dropped on arrival)
                task = self.running.pop(sid, None)
                if task is not None:
                    task.cancel()  # the replica's generator marks its request closed
            elif op == "hook_mode_info":
                loop.create_task(self._hook_mode_info(header))

    async def _stream(self, sid: int, header: dict, body) -> None:
        try:
            try:
                payload = payload_of_run(header, body)
            except (KeyError, TypeError, ValueError) as exc:  # a bug of ours at the front
                await self._send(items_messages(sid, [replies.error(None, exc)])[0])
                return
            del body
            try:
                async for items in self.replica.run(payload):
                    for message in items_messages(sid, items):
                        await self._send(message)
            except Exception:  # a bug of ours: the front answers the request with an error
                log.exception("request stream %d failed in the model process", sid)
        finally:
            self.running.pop(sid, None)
            if not self.writer.is_closing():
                await self._send(pack({"op": "end", "sid": sid}))

    async def _hook_mode_info(self, header: dict) -> None:
        answer = await asyncio.get_running_loop().run_in_executor(
            None, self.replica.hook_mode_info, list(header["flags"]))
        await self._send(pack({"op": "answer", "qid": header["qid"], "text": answer}))

    async def _send(self, parts: list) -> None:
        if self.writer.is_closing():
            return
        try:
            self.writer.writelines(parts)
            await self.writer.drain()
        except ConnectionError:  # the front is gone: serve() sees the link end too
            pass


async def _main(in_fd: int, out_fd: int, spec: dict) -> int:
    from hookwire.server.heap import model_threads
    from hookwire.server.ray_replica import ModelReplica

    model_threads(spec.get("threads"))  # as `hookwire serve` sets its own (server/heap.py)
    loop = asyncio.get_running_loop()
    in_sock = socket.socket(fileno=in_fd)
    out_sock = socket.socket(fileno=out_fd)
    _, writer = await asyncio.open_connection(sock=out_sock)
    try:
        # Loading the model blocks: fine, nothing else runs in this process yet.
        replica = ModelReplica(spec["model"], spec["limits"], spec["batching"],
                               spec["window_s"], device_map=spec.get("device_map"),
                               dtype=spec.get("dtype"), device=spec.get("device"),
                               replica_id=f"process-{os.getpid()}", front_says_alone=True)
    except Exception as exc:
        log.exception("the model process could not load %s", spec.get("model"))
        writer.writelines(pack({"op": "failed", "error": f"{type(exc).__name__}: {exc}"}))
        await writer.drain()
        return 1
    writer.writelines(pack({"op": "info", **replica.info()}))
    await writer.drain()
    # (Keep both writers: a StreamWriter that is collected closes its transport.)
    reader, in_writer = await asyncio.open_connection(sock=in_sock)
    link = ReplicaLink(replica, reader, writer)
    try:
        await link.serve()
    finally:
        for task in list(link.running.values()):
            task.cancel()
        replica.worker.stop()
        await loop.run_in_executor(None, replica.worker.join, 30)
        in_writer.close()
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[model process]: %(message)s")
    in_fd, out_fd = int(argv[1]), int(argv[2])
    spec = json.loads(sys.stdin.readline())  # written by the front that started us
    return asyncio.run(_main(in_fd, out_fd, spec))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
