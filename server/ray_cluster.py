"""Everything that talks to Ray itself: connecting (or starting a local instance), keeping
what Ray opens on this node's address only, and deploying a model as a Serve application.

Importing this module imports Ray (the ``ray`` extra); nothing else in hookwire does, so the
embedded engine never loads it.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile

# Before ray is imported: on these machines Ray otherwise rewrites a loopback node address to
# the machine's external one (its "cluster mode" address discovery).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray's distributed tqdm otherwise replaces builtins.print in this (the front's) process for
# good, which a user's code in the same process would not expect.
os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray._private import ray_constants  # noqa: E402

SETUP_HOOK = "hookwire.server.ray_cluster.bind_internal_grpc_to_node_ip"
LOOPBACK = "127.0.0.1"
_private_temp_dir: str | None = None  # the session folder of a Ray this process started


def _define_anyio_classes_first() -> None:
    """nnsight (which pyvene imports when it is installed) mounts a ``save`` attribute on
    ``object``; anyio refuses to define its socket attribute classes once every class has an
    unannotated ``save``, and Serve replicas import them late, at initialization. Defining
    them first, before anything can import nnsight, keeps replicas starting."""
    try:
        import anyio._backends._asyncio  # noqa: F401
    except Exception:  # already broken by an earlier import: Serve will say so
        pass


def bind_internal_grpc_to_node_ip() -> None:
    """Worker setup hook: a Serve replica opens an inter-deployment gRPC server on "[::]:0"
    (all interfaces, ray/serve/_private/replica.py ``_on_initialized``). Bind it to the node's
    own address instead: loopback on a single machine, the node IP on a real cluster."""
    _define_anyio_classes_first()
    try:
        from ray.serve._private import replica
    except ImportError:  # a worker that will never be a replica
        return
    original = getattr(replica.add_port_to_grpc_server, "__wrapped__", None) or \
        replica.add_port_to_grpc_server

    def add_port(server, address):
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = f"{_node_ip()}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    add_port.__wrapped__ = original
    replica.add_port_to_grpc_server = add_port


def _node_ip() -> str:
    try:
        return ray.util.get_node_ip_address()
    except Exception:
        return LOOPBACK


def runtime_env() -> dict:
    return {"worker_process_setup_hook": SETUP_HOOK,
            "env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}}


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` ("auto": the one started with ``ray start`` on
    this node), or start a private local instance on 127.0.0.1 when None. Returns True when
    this call started Ray (and so should shut it down)."""
    if ray.is_initialized():
        return False
    if address is None:
        # A private instance stays on loopback even if ray was imported before this module
        # set the variable (Ray reads it at import; its processes read it at start).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        global _private_temp_dir
        # Its own session folder (logs, sockets), not the shared /tmp/ray; removed at shutdown.
        _private_temp_dir = tempfile.mkdtemp(prefix="hookwire_ray_")
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK,
                 runtime_env=runtime_env(), log_to_driver=False,
                 configure_logging=False, _temp_dir=_private_temp_dir)
        return True
    ray.init(address=address, runtime_env=runtime_env(), log_to_driver=False)
    return False


def app_name(model_spec: str) -> str:
    return "hookwire-" + re.sub(r"[^A-Za-z0-9_-]", "_", model_spec)[-48:]


def deploy(model_spec: str, *, replicas: int, limits: dict, batching: bool, window_s: float,
           num_cpus: float = 1, num_gpus: float = 0, device_map=None,
           max_ongoing_requests: int = 64, dtype=None, device=None, replica_class=None):
    """One Serve application per model: ``replicas`` copies, each with ``num_cpus`` CPUs and
    ``num_gpus`` GPUs of its own (``device_map`` spreads the model over them; ``dtype`` and
    ``device`` as for ``hookwire serve``: names, not objects, cross to the replica). Returns the
    deployment handle. No HTTP proxy: the websocket front reaches replicas through handles.
    ``replica_class``: a subclass of ``ModelReplica`` to deploy instead (tests)."""
    from hookwire.server.ray_replica import ModelReplica

    serve.start(proxy_location="Disabled")
    deployment = serve.deployment(
        replica_class or ModelReplica, name="model", num_replicas=replicas,
        # Many requests may wait inside one replica: that is what its batcher groups.
        max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=2, health_check_timeout_s=30,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus,
                           "runtime_env": runtime_env()})
    app = deployment.bind(model_spec, limits, batching, window_s, device_map,
                          None if dtype is None else str(dtype).replace("torch.", ""),
                          None if device is None else str(device))
    try:
        return serve.run(app, name=app_name(model_spec), route_prefix=None)
    except RuntimeError as exc:  # Serve says only "failed": add why the replicas did
        raise RuntimeError(f"{exc}\n{_replica_errors()}") from None


def _replica_errors(max_chars: int = 4000) -> str:
    """The ends of the replica logs that mention an error, from a Ray this process started."""
    if _private_temp_dir is None:
        return "(replica logs: see the Ray cluster's session folder)"
    found = []
    for path in sorted(glob.glob(os.path.join(_private_temp_dir, "session_*", "logs", "**",
                                              "*replica*"), recursive=True)):
        try:
            with open(path, errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue
        if "Error" in text or "Traceback" in text:
            found.append(f"--- {os.path.basename(path)}\n{text[-max_chars:]}")
    return "\n".join(found)[-max_chars:] or "(no replica log mentions an error)"


def undeploy(model_spec: str) -> None:
    serve.delete(app_name(model_spec))


def shutdown() -> None:
    global _private_temp_dir
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        if _private_temp_dir is not None:
            shutil.rmtree(_private_temp_dir, ignore_errors=True)
            _private_temp_dir = None


# The replica (or its worker process, or its node) died: the request may go to another one.
RETRYABLE = tuple(getattr(ray.exceptions, name) for name in (
    "RayActorError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
    "OutOfMemoryError") if hasattr(ray.exceptions, name))
# Ray's memory monitor killed it: perhaps because of this very request, so it is sent again
# once at most (a request that exhausts memory must not take down replica after replica).
OUT_OF_MEMORY = (ray.exceptions.OutOfMemoryError,)

__all__ = ["connect", "deploy", "undeploy", "shutdown", "bind_internal_grpc_to_node_ip",
           "RETRYABLE", "OUT_OF_MEMORY"]
