"""A queued job as plain data, for an engine that runs it in another process (Ray replicas).

What crosses: the submit as the message the client sent (which the front has parsed and
admitted; parsed again on the other side with the same validating parser), each tensor as a
header dict and its raw bytes.
No Python object of the user's crosses, so nothing on the replica trusts a pickled value of
theirs. (Ray pickles its own RPC envelope around these dicts and bytes; that happens between
processes of our own cluster, never on data read from a socket.)
"""
from __future__ import annotations

import torch

from hookwire.frames import TensorHeader, bytes_to_tensor, header_for, tensor_bytes
from hookwire.protocol import ResidentRef, Submit, dump, parse_client_message_bounded
from hookwire.server.worker import Job


def job_to_payload(job: Job, copy: bool = True) -> dict:
    """``job`` as plain data. Its references to resident values travel as the resident (its
    bytes, once per resident) and the view, when the view is larger than the resident (a
    stride-0 view of a small value): the model's side copies such a view when the request
    runs, with the worker's give-way, as the embedded engine does, instead of the front
    copying it here. A view no larger than its resident is copied here (no more bytes than
    the resident itself would be). ``copy=False``: tensors' bytes as views of the tensors
    (for a sender that writes them out itself, instead of copying each upload again here)."""
    as_data = bytes if copy else (lambda view: view)
    tensors = []
    for tid, tensor in job.tensors.items():
        tensors.append({"header": header_for(tid, tensor).model_dump(),
                        "data": as_data(tensor_bytes(tensor))})
    bases: dict[int, str] = {}  # id(base tensor) -> its tid in the payload
    refs = []
    for tid, base, ref in job.refs:
        view = base.as_strided(ref.shape, ref.stride, ref.offset)
        if view.numel() <= base.numel():
            tensors.append({"header": header_for(tid, view).model_dump(),
                            "data": as_data(tensor_bytes(view))})
            continue
        if id(base) not in bases:
            bases[id(base)] = f"__resident{len(bases)}"
            tensors.append({"header": header_for(bases[id(base)], base).model_dump(),
                            "data": as_data(tensor_bytes(base))})
        refs.append({"tid": tid, "base": bases[id(base)], "ref": ref.model_dump()})
    text = job.submit_text if job.submit_text is not None else dump(job.submit)
    return {"submit": text.decode() if isinstance(text, bytes) else text, "user": job.conn.user,
            "received_bytes": job.received_bytes, "tensors": tensors, "refs": refs,
            "mates_possible": job.mates_possible}


def job_from_payload(payload: dict, conn) -> Job:
    """The job a payload carries. The submit is parsed by the server's bounded parser
    (long lists in short slices, so a large graph's parse lets other threads run between
    them); the front has already admitted it, so its caps cannot refuse it here."""
    text = payload["submit"]
    _, submit = parse_client_message_bounded(text, max_containers=len(text))
    if not isinstance(submit, Submit):
        raise TypeError("a job payload must carry a submit")
    tensors: dict[str, torch.Tensor] = {}
    for item in payload["tensors"]:
        header = TensorHeader.model_validate(item["header"])
        tensors[header.tid] = bytes_to_tensor(header, item["data"])
    refs, bases = [], {}
    for item in payload.get("refs", []):
        if item["base"] not in bases:  # (a resident is sent once, however many views of it)
            bases[item["base"]] = tensors.pop(item["base"])
        base = bases[item["base"]]
        ref = ResidentRef.model_validate(item["ref"])
        # torch refuses a view outside the resident's storage; the front checked it too
        base.as_strided(ref.shape, ref.stride, ref.offset)
        refs.append((item["tid"], base, ref))
    return Job(conn, submit.request_id, submit, tensors, int(payload["received_bytes"]),
               refs=refs, mates_possible=bool(payload.get("mates_possible", True)))


__all__ = ["job_to_payload", "job_from_payload"]
