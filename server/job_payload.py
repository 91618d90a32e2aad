"""A queued job as plain data, for an engine that runs it in another process (Ray replicas).

What crosses is produced by our own code: the submit as its protocol JSON (parsed again on the
other side with the same validating parser), each tensor as a header dict and its raw bytes.
No Python object of the user's crosses, so nothing on the replica trusts a pickled value of
theirs. (Ray pickles its own RPC envelope around these dicts and bytes; that happens between
processes of our own cluster, never on data read from a socket.)
"""
from __future__ import annotations

import torch

from hookwire.frames import TensorHeader, bytes_to_tensor, header_for, tensor_bytes
from hookwire.protocol import Submit, dump, parse_client_message
from hookwire.server.worker import Job


def job_to_payload(job: Job) -> dict:
    tensors = []
    for tid, tensor in job.tensors.items():
        tensors.append({"header": header_for(tid, tensor).model_dump(),
                        "data": bytes(tensor_bytes(tensor))})
    return {"submit": dump(job.submit), "user": job.conn.user,
            "received_bytes": job.received_bytes, "tensors": tensors,
            "mates_possible": job.mates_possible}


def job_from_payload(payload: dict, conn) -> Job:
    submit = parse_client_message(payload["submit"])
    if not isinstance(submit, Submit):
        raise TypeError("a job payload must carry a submit")
    tensors: dict[str, torch.Tensor] = {}
    for item in payload["tensors"]:
        header = TensorHeader.model_validate(item["header"])
        tensors[header.tid] = bytes_to_tensor(header, item["data"])
    return Job(conn, submit.request_id, submit, tensors, int(payload["received_bytes"]),
               mates_possible=bool(payload.get("mates_possible", True)))


__all__ = ["job_to_payload", "job_from_payload"]
