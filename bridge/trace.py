"""Tracing: turn a hook function's torch operations into graph nodes, without running code
anywhere but here.

A hook receives a :class:`Proxy` where it expected an activation. A Proxy is a tensor subclass
with no storage that reports the real shape and dtype (and ``cpu`` as device, so tensors a hook
builds "on the activation's device" are real, sendable constants). Every torch call that touches
a Proxy lands in :meth:`Tracer.handle`, which computes the result's shape on the meta device and
records a node.

In-place edits are *functionalized*: ``act[:, :, h] = 0`` records a new value and rebinds the
Python object to it. Views remember their base, so an edit through a view (TL's ``hook_z`` is a
``view`` of the raw activation) rewrites the base too, and views of a value that changed since
are re-derived when next used -- what torch's aliasing would have given.

What cannot become a node (reading values with ``.item()``, ``if tensor:``, printing values,
``.numpy()``, file or network I/O) raises :class:`TraceError` naming the user's file and line.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from hookwire.errors import HookwireError, TraceError
from hookwire.frames import DTYPE_NAMES
from hookwire.ir.args import Const, Ref, decode_arg, encode_arg
from hookwire.ir.kinds import check_args
from hookwire.ir.special import OUTPUT_READ, SITE_GRAD, SITE_READ, SITE_WRITE
from hookwire.ir.wire import PARAMETER_PREFIX, node_json
from hookwire.op_advice import display_name as _display_name, unsupported_advice
from hookwire.ops import CLIENT_OPS, INPLACE_OPS, OPS, check_index_range
from hookwire.shape_probe import check_on_twins

T = torch.Tensor
_STATE = threading.local()

# Metadata a hook may read freely: it is known without the values.
_METADATA_NAMES = (
    "shape", "size", "dim", "ndim", "ndimension", "numel", "nelement", "dtype", "device",
    "is_cuda", "requires_grad", "layout", "stride", "is_contiguous", "__len__",
    "element_size", "is_floating_point", "is_complex", "get_device", "is_meta", "__hash__",
    "is_leaf", "grad_fn", "is_sparse", "is_quantized", "is_nested", "is_mps",
    "storage_offset", "itemsize", "nbytes", "is_inference", "output_nr", "grad", "_base")
# The calls and getters of those names, as a hook's torch function sees them (the tracers of
# the TL and nnsight fronts check against this set too).
METADATA_CALLS = set()
for _n in _METADATA_NAMES:
    _attr = T.__dict__.get(_n) if _n in T.__dict__ else getattr(torch._C.TensorBase, _n, None)
    if _attr is None:
        continue
    METADATA_CALLS.add(_attr.__get__ if hasattr(_attr, "__get__") and not callable(
        getattr(T, _n, None)) or isinstance(_attr, property) or type(_attr).__name__ in (
        "getset_descriptor", "member_descriptor") else getattr(T, _n))

_ADVICE_VALUES = ("the values are not known while tracing: they only exist on the server. "
                  "Keep the computation in torch ops (e.g. torch.where instead of `if`), or "
                  "save the tensor and inspect it after the run")
_BLOCKED = {
    T.item: "`.item()` reads a value",
    T.tolist: "`.tolist()` reads values",
    T.numpy: "`.numpy()` reads values",
    T.__bool__: "using a tensor as a truth value (`if`/`while`/`and`/`or`) reads its value",
    T.__int__: "`int(tensor)` reads a value",
    T.__float__: "`float(tensor)` reads a value",
    T.__index__: "using a tensor as a Python index reads its value",
    T.__complex__: "`complex(tensor)` reads a value",
    T.__repr__: "printing a tensor's values",
    T.__str__: "printing a tensor's values",
    T.__format__: "formatting a tensor's values",
    T.__array__: "converting to numpy reads values",
    T.__contains__: "`x in tensor` reads values",
    T.data_ptr: "raw memory access",
    T.untyped_storage: "raw storage access",
    T.__reduce_ex__: "pickling/saving a tensor (file I/O)",
    T.__deepcopy__: "deep-copying an activation",
    T.backward: "calling backward inside a hook",
    # Its .grad would be read after a local backward that never happens here.
    T.retain_grad: "`retain_grad()` on an activation (to read its `.grad` after a local "
                   "backward)",
    T.nonzero: "`nonzero` has a shape that depends on values",
    T.masked_select: "`masked_select` has a shape that depends on values",
    T.unique: "`unique` has a shape that depends on values",
}
for _f in (torch.nonzero, torch.masked_select, torch.unique, torch.save):
    _BLOCKED.setdefault(_f, "an op whose result depends on values or writes files")

_CASTS = {T.float: torch.float32, T.double: torch.float64, T.half: torch.float16,
          T.bfloat16: torch.bfloat16, T.long: torch.int64, T.int: torch.int32,
          T.bool: torch.bool, T.short: torch.int16, T.byte: torch.uint8, T.char: torch.int8}
_DEVICE_MOVES = {T.cpu, T.cuda, T.requires_grad_, T.pin_memory, T.share_memory_}

# Random draws that do not depend on the values of the tensor they are shaped like: drawn here,
# from the caller's generator, exactly as a local run would draw them, and sent as constants.
_LOCAL_DRAWS = {torch.randn_like, torch.rand_like, torch.randint_like}
_LOCAL_FILLS = {T.normal_, T.uniform_, T.bernoulli_, T.random_, T.exponential_, T.geometric_,
                T.cauchy_, T.log_normal_}
# Dropout is the input times a mask drawn from the input's shape alone.
_DROPOUTS = {F.dropout, torch.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
# Draws whose distribution depends on the values: they would need the server's values here.
_VALUE_DRAWS = {
    torch.bernoulli: "(hookwire.rand_like(p, seed) < p).to(p.dtype)",
    T.bernoulli: "(hookwire.rand_like(p, seed) < p).to(p.dtype)",
    torch.normal: "mean + std * torch.randn_like(mean)",
    torch.poisson: "a fixed tensor drawn locally, or saving the rates and drawing after the run",
    torch.multinomial: "torch.distributions.Categorical on the saved probabilities after the run",
    T.multinomial: "torch.distributions.Categorical on the saved probabilities after the run",
    F.alpha_dropout: "F.dropout, or training=False",
    F.feature_alpha_dropout: "F.dropout, or training=False",
}
_RESHAPE_VIEWS = {"view", "reshape", "view_as", "reshape_as", "flatten", "unflatten",
                  "squeeze", "unsqueeze", "detach", "contiguous"}
_PERMUTE_VIEWS = {"transpose", "swapaxes", "swapdims", "permute", "movedim", "t", "T", "mT"}
_INDEX_VIEWS = {"getitem", "select", "narrow"}
_PIECE_OPS = {"unbind", "split", "chunk"}
_DROP_KWARGS = {"_stacklevel", "memory_format", "non_blocking", "copy"}
# Where a new tensor lives: the server puts it beside the activation it is made from.
_PLACEMENT_KWARGS = {"device", "requires_grad", "layout", "pin_memory"}

_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch,)) + (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def library_dirs() -> tuple[str, ...]:
    """Path prefixes of library code (torch, TL, nnsight, hookwire and its adapters, those
    imported so far): a stack frame outside them is the user's line an error names."""
    dirs = list(_LIBRARY_DIRS)
    # nnsight runs a trace block's code in greenlets, through its own frames: the user's
    # line is the innermost frame outside these. transformers: a block that calls a served
    # module (`model.transformer.h[1].mlp(h)`) meets an op inside the module's forward; the
    # error names the block's line that called it.
    for name in ("transformer_lens", "einops", "functools", "hookwire", "nnsight", "greenlet",
                 "transformers",
                 "hookwire.transformerlens", "hookwire.pyvene", "hookwire.hf",
                 "hookwire.nnsight"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None):
            path = os.path.dirname(os.path.abspath(mod.__file__))
            dirs.append(path + os.sep if name != "functools" else mod.__file__)
    return tuple(dirs)


def user_location() -> tuple[str, int] | None:
    """The innermost stack frame that belongs to the user's code, as (file, line)."""
    dirs = library_dirs()
    frame = sys._getframe(1)
    while frame is not None:
        fname = os.path.abspath(frame.f_code.co_filename)
        if not fname.startswith(dirs) and not fname.startswith("<frozen"):
            return frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back
    return None


def _region_of(value):
    """(base, index) where ``value`` is a basic index view of ``base`` (``x[:, :-1]``), else
    (value, None): the whole of it."""
    view = getattr(value, "_hw_view", None)
    if isinstance(value, Proxy) and view is not None and view.index is not None:
        return view.base, view.index
    return value, None


def _covered(shape, index) -> list | None:
    """Per dimension of ``shape``, the positions a basic ``index`` covers (None: not a basic
    index, or too large to list)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.Tensor) or isinstance(i, (list, bool)) for i in index) or \
            any(d > 1 << 20 for d in shape):
        return None
    if index.count(Ellipsis) > 1:
        return None
    index = tuple(i for i in index if i is not None)
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (len(shape) - len(index) + 1) + index[k + 1:]
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for i, size in zip(index, shape):
        if isinstance(i, int):
            out.append({i % size} if size else set())
        elif isinstance(i, slice) and all(isinstance(v, (int, type(None)))
                                          for v in (i.start, i.stop, i.step)):
            out.append(set(range(*i.indices(size))))
        else:
            return None
    return out


def _refuse_edit_of_shared_memory(target: Proxy, func) -> None:
    """An in-place edit of a tensor whose elements share memory -- an activation that is one
    row broadcast over the batch (GPT-2's ``hook_pos_embed``, hookwire.site_layout), or a
    view of one -- is refused: locally the edit reaches every element that shares the memory
    (``x.unbind(0)[1].mul_(2)`` changes every row), or torch refuses it; the trace edits
    values, not memory, and cannot carry that back (the server failed the request)."""
    proxy: Proxy | None = target
    while proxy is not None:
        meta = proxy._hw_meta
        if any(size > 1 and step == 0 for size, step in zip(meta.shape, meta.stride())):
            what = "an activation broadcast over a dim (one value for every batch row)" \
                if proxy._hw_view is None else "a broadcast view (`expand` and the like)"
            raise trace_error(
                f"`{_display_name(func)}` on {what}, whose elements share memory: locally "
                "the edit reaches every element that shares it, or torch refuses it",
                "build the new value out of place and return it from the hook "
                "(`x = x.clone(); ...; return x`), or .clone() the view first if the edit "
                "should stay in it")
        proxy = proxy._hw_view.base if proxy._hw_view is not None else None


def _refuse_partial_overlap(dst, src) -> None:
    """An in-place copy (``x[:, 1:] = x[:, :-1]``, ``a.copy_(b)``) whose source is another,
    overlapping part of the very tensor it writes: locally torch copies element by element
    in memory order, reading what it may already have overwritten; the traced copy reads
    the source as it was. Refused; a region onto itself (the same index) and disjoint ones
    are fine."""
    (dst_base, dst_index), (src_base, src_index) = dst, src
    if dst_base is not src_base or not isinstance(dst_base, Proxy) or \
            (dst_index is None and src_index is None):
        return
    shape = tuple(dst_base.shape)
    a = _covered(shape, slice(None) if dst_index is None else dst_index)
    b = _covered(shape, slice(None) if src_index is None else src_index)
    if a is None or b is None or not all(x & y for x, y in zip(a, b)) or \
            (a == b and repr(dst_index) == repr(src_index)):  # (the region onto itself)
        return
    raise trace_error("an in-place copy whose source overlaps its destination in the same "
                      "tensor (locally torch reads elements it has already overwritten)",
                      "copy from a clone instead, e.g. x[:, 1:] = x[:, :-1].clone()")


def _version_of(tensor: torch.Tensor) -> int | None:
    """Its in-place edit count (None: not counted, e.g. an inference tensor)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def trace_error(what: str, advice: str = _ADVICE_VALUES) -> TraceError:
    loc = user_location()
    tracer = getattr(_STATE, "tracer", None)
    ctx = tracer.context if tracer is not None else None
    prefix = ""
    if ctx:
        prefix = f"hook {ctx[0]!r} on {ctx[1]!r}"
    if loc:
        prefix += f" at {loc[0]}:{loc[1]}"
    msg = f"{prefix}: {what} cannot be traced for a remote run; {advice}".lstrip(": ")
    return TraceError(msg, hook=ctx[0] if ctx else None, site=ctx[1] if ctx else None,
                      file=loc[0] if loc else None, line=loc[1] if loc else None)


# ---- file and network I/O while tracing ---------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_IO_EVENTS = {"socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind",
              "http.client.connect", "urllib.Request", "subprocess.Popen", "os.system",
              "os.exec", "os.posix_spawn", "os.spawn", "os.remove", "os.rename", "os.mkdir",
              "os.rmdir", "shutil.rmtree", "shutil.copyfile", "ftplib.connect",
              "smtplib.connect"}


def _audit(event: str, args) -> None:
    if not getattr(_STATE, "tracing", False):
        return
    if event == "open":
        mode = args[1] if len(args) > 1 else None
        flags = args[2] if len(args) > 2 else 0
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
        if not writing:
            return
    elif event not in _IO_EVENTS:
        return
    if not _caused_by_user_code():
        return  # e.g. torch importing a submodule lazily while computing a meta shape
    _STATE.tracing = False  # building the message must not trip the hook again
    try:
        err = trace_error(f"file or network I/O ({event})",
                          "traced code (a hook, an nnsight trace block) runs once on your "
                          "machine while tracing, not at each forward on the server. Do I/O "
                          "after the run, on the returned tensors")
    finally:
        _STATE.tracing = True
    raise err


def _caused_by_user_code() -> bool:
    """True unless the I/O happens while a module is being imported (torch imports parts of
    itself lazily, e.g. while computing a meta shape, and those imports may create cache
    folders). Nothing else runs during tracing but the user's hooks and our pure code."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith("<frozen importlib"):
            return False
        # Garbage collection may run a finalizer at any point, tracing included (a
        # TemporaryDirectory's weakref.finalize removing its folder): not the user's hook.
        if code.co_name == "__del__" or (code.co_name == "__call__" and
                                         code.co_filename.endswith("weakref.py")):
            return False
        frame = frame.f_back
    return True


sys.addaudithook(_audit)


def _guard_torch_save():
    """torch.save opens its file in C++, out of sight of the audit hook, and only then pickles
    (where a Proxy would refuse). Refuse before anything is written while tracing."""
    original = torch.save
    if getattr(original, "_hookwire_guarded", False):
        return

    def save(*args, **kwargs):
        if getattr(_STATE, "tracing", False):
            raise trace_error("torch.save (file I/O)",
                              "traced code (a hook, an nnsight trace block) runs once on "
                              "your machine while tracing, not at each forward on the "
                              "server. Save the returned tensors after the run")
        return original(*args, **kwargs)

    save._hookwire_guarded = True
    save.__wrapped__ = original
    save.__doc__ = original.__doc__
    torch.save = save


_guard_torch_save()


# ---- proxies ------------------------------------------------------------------------------

class _ViewOf:
    """How a view proxy relates to its base: re-derive it, or write an edit back. ``replay``
    (views that keep every element) makes the view from the base's real value on the client
    (:mod:`hookwire.aliases`)."""
    __slots__ = ("base", "redo", "undo", "base_version", "replay", "key", "index", "piece")

    def __init__(self, base, redo, undo, base_version, replay=None, key=None, index=None,
                 piece=None):
        self.base, self.redo, self.undo, self.base_version = base, redo, undo, base_version
        self.replay = replay
        self.key = key  # what view of the base this is (equal keys: equal values)
        self.index = index  # a basic index view: the index (what it covers of the base)
        # The multi-output op (unbind, split, chunk, iteration) this view is, or is a view
        # of, a piece of: torch refuses in-place edits of those under autograd.
        self.piece = piece


class Proxy(torch.Tensor):
    """What a hook receives instead of an activation: a storage-less tensor subclass that
    reports the real shape, dtype and strides (device ``cpu``) and stands for graph node
    ``_hw_node`` of its :class:`Tracer`. Every torch function or dispatch on it goes to
    ``Tracer.handle``, which records a node and returns a new Proxy; reading its values
    raises :class:`TraceError`. ``_hw_view`` remembers the base it is a view of, and
    ``_hw_version`` counts in-place edits (so stale views are re-derived)."""
    # Set by __new__ (a wrapper subclass has no __init__ to declare them in).
    _hw_tracer: Tracer
    _hw_node: int
    _hw_meta: torch.Tensor
    _hw_view: _ViewOf | None
    _hw_version: int
    _hw_key: tuple

    @staticmethod
    def __new__(cls, tracer: "Tracer", node: int, meta: torch.Tensor,
                requires_grad: bool = False):
        # requires_grad is only ever reported (Tracer.track_grad): no autograd runs on proxies.
        p = torch.Tensor._make_wrapper_subclass(
            cls, meta.shape, strides=meta.stride(), dtype=meta.dtype, device="cpu",
            requires_grad=requires_grad and (meta.dtype.is_floating_point
                                             or meta.dtype.is_complex))
        p._hw_tracer = tracer
        p._hw_node = node
        p._hw_meta = meta
        p._hw_view = None
        p._hw_version = 0
        # Known not to require grad where the library runs the hook (integers; made by
        # detach, or computed from such values or under no_grad): a piece of it may be
        # edited in place.
        p._hw_nograd = not (meta.dtype.is_floating_point or meta.dtype.is_complex)
        p._hw_key = ("T", tuple(meta.shape), meta.dtype, tuple(meta.stride()))
        tracer.created.append(weakref.ref(p))
        return p

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA_CALLS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        tracer = _find_tracer(args, kwargs)
        if tracer.closed:
            raise _dead_proxy_error(tracer)
        return tracer.handle(func, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise trace_error(f"the operation {func}", "it reached torch's dispatcher without "
                          "being traced; it is not supported in remote hooks")


def _find_tracer(args, kwargs):
    stack = [args, tuple(kwargs.values())]
    while stack:
        for v in stack.pop():
            if isinstance(v, Proxy):
                return v._hw_tracer
            if isinstance(v, (tuple, list)):
                stack.append(v)
    return _STATE.tracer


def _dead_proxy_error(owner: "Tracer | None" = None) -> HookwireError:
    """A Proxy left over from another trace (kept in hook.ctx or a dict by a run that failed)
    has no value: using it must fail loudly, never turn into a reference to a wrong node."""
    if owner is not None and not owner.closed:
        # A live proxy of another graph: another forward of the same run (a generation
        # step), which the server runs as a graph of its own.
        return trace_error("a value traced in another forward pass (another generation "
                           "step, or another trace)", "each forward runs on the server as a "
                           "graph of its own: compute the value in the forward that uses it, "
                           "or save it and pass the real tensor to a later trace")
    return HookwireError("this tensor was stored by a hook during a remote run that failed, "
                         "so it never received a value; rerun the call that produces it")


def _is_backward(func) -> bool:
    # By name: nnsight replaces Tensor.backward (to open `with loss.backward():` blocks), so
    # which function object arrives here depends on import order.
    return getattr(func, "__qualname__", None) == "Tensor.backward"


def _bound(value):
    """A slice bound that is a real 0-d integer tensor (``x[..., :dim_tensor]``) means its
    value, as it does to torch; proxies and plain ints pass through."""
    if isinstance(value, torch.Tensor) and not isinstance(value, Proxy) and value.dim() == 0 \
            and not value.is_floating_point() and value.device.type != "meta":
        return int(value)
    return value


def _base_of(meta: torch.Tensor):
    return meta._base if meta._base is not None else meta


class Tracer:
    """Records one request's graph: nodes, constants, sites, saves."""

    def __init__(self):
        self.nodes: list[dict] = []
        self._constants: dict[str, torch.Tensor] = {}
        self._const_by_obj: dict[int, str] = {}
        # tid -> (the captured object's version then, hook and site, file and line): a
        # constant is sent once, as it is when the request goes; one edited in place after
        # a hook used it would differ from what that hook saw locally (check_constants).
        self._const_seen: dict[str, tuple] = {}
        self.sites: list[dict] = []
        self.saves: dict[str, int] = {}
        self.backward: int | None = None  # node to differentiate after the forward
        self.created: list[weakref.ref] = []
        self.context: tuple[str, str] | None = None
        self._next = 0
        self._kept: list = []
        self.closed = False  # set when the run failed: its proxies have no value, ever
        self.caller_draws = 0  # random draws made from the caller's generator while tracing
        self.user_refs: dict[int, int] = {}  # escaped proxy id -> references user code holds
        # Extension points for adapters whose library drives autograd on the traced values
        # (nnsight's `with loss.backward():` blocks). Unset, both are refused as before.
        # track_grad: proxies report requires_grad as autograd would compute it.
        self.track_grad = False
        # Whether the hooks' activations require grad where the library runs them locally
        # (grad mode on, trainable weights): then torch refuses some in-place edits that
        # are fine without autograd (pieces of unbind/split/chunk), and so does the trace.
        self.activations_require_grad = False
        # on_backward(tensor, args, kwargs) runs for `tensor.backward(...)` on a proxy;
        # on_register_hook(tensor, fn) for `tensor.register_hook(fn)`, returning a handle.
        self.on_backward = None
        self.on_register_hook = None
        # id(tensor) -> name, for tensors standing for a parameter (or buffer) of the served
        # model (a weightless stand-in's meta weights): used as "@<name>" constants, which the
        # server resolves to its own tensor. Each such tensor is kept in the dict's values'
        # owner (the stand-in), so ids stay valid.
        self.parameters: dict[int, str] = {}
        self.parameter_refs: set[str] = set()

    # ---- recording ------------------------------------------------------------------------
    def emit(self, op: str, args: tuple = (), kwargs: dict | None = None) -> int:
        """Record one node -- the JSON of a wire ``Node`` (:mod:`hookwire.ir.wire`) -- and
        return its id."""
        nid = self._next
        self._next += 1
        self.nodes.append(node_json(nid, op, [self._encode(a) for a in args],
                                    {k: self._encode(v) for k, v in (kwargs or {}).items()}))
        return nid

    def _encode(self, value):
        """Python/torch argument -> JSON graph argument, in one pass."""
        t = type(value)
        if t is Proxy:
            return {"ref": self.current(value)}
        if t is int or t is bool or t is str or value is None:
            return value
        if t is float:
            return encode_arg(value)
        if t is slice:
            return {"slice": [self._encode(_bound(value.start)), self._encode(_bound(value.stop)),
                              self._encode(_bound(value.step))]}
        if t is tuple or t is torch.Size:
            return [self._encode(v) for v in value]
        if t is list:
            return {"list": [self._encode(v) for v in value]}
        return encode_arg(self._lower(value))

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        self._kept.append(tensor)
        return tensor

    def export_constants(self, prefix: str, tensors: dict, shared: dict) -> dict[str, str]:
        """Name this trace's constants for a request that carries several graphs (a
        generation's forwards): each goes into ``tensors`` as ``prefix + tid``, except a tensor
        another graph of the request already captured (the same object), whose upload is
        shared (``shared``: id of the captured object -> its name). Returns tid -> name."""
        originals = {tid: obj for tid, obj in self._const_by_obj.values()}
        names = {}
        for tid, tensor in self.constants.items():
            key = id(originals[tid]) if tid in originals else None
            if key is not None and key in shared:
                names[tid] = shared[key]
                continue
            names[tid] = f"{prefix}{tid}"
            tensors[names[tid]] = tensor
            if key is not None:
                shared[key] = names[tid]
        return names

    def constant(self, tensor: torch.Tensor) -> Const:
        # Keyed by identity; the entry keeps the object alive so its id cannot be reused
        # by a later temporary tensor.
        entry = self._const_by_obj.get(id(tensor))
        tid = entry[0] if entry is not None and entry[1] is tensor else None
        if tid is not None:
            self._check_unchanged(tid, tensor)
        name = self.parameters.get(id(tensor)) if tid is None else None
        if name is not None:
            self.parameter_refs.add(PARAMETER_PREFIX + name)
            return Const(PARAMETER_PREFIX + name)
        if tid is None:
            if tensor.device.type == "meta":
                raise trace_error("a tensor with no data (meta device), such as a weight of a "
                                  "weightless remote model,", "read weights on the server by "
                                  "hooking the site that uses them, or use a local model that "
                                  "has its weights with remote=True (weights it computes with "
                                  "are then sent as constants)")
            if tensor.dtype not in DTYPE_NAMES:
                raise trace_error(f"a captured tensor of dtype {tensor.dtype}",
                                  "use one of " + ", ".join(map(str, DTYPE_NAMES)))
            tid = f"c{len(self._constants)}"
            self._constants[tid] = tensor.detach()
            self._const_by_obj[id(tensor)] = (tid, tensor)
            self._const_seen[tid] = (_version_of(tensor), self.context, user_location())
        return Const(tid)

    @property
    def constants(self) -> dict[str, torch.Tensor]:
        """The captured tensors, by id, as the request sends them (each checked unchanged
        since its capture: :meth:`check_constants`)."""
        self.check_constants()
        return self._constants

    def check_constants(self) -> None:
        """Raise if a captured tensor was edited in place after a hook used it (a later hook,
        or code between the hooks): locally that hook computed with the value as it was
        then; the request can carry only one value."""
        for tid, tensor in self._const_by_obj.values():
            self._check_unchanged(tid, tensor)

    def _check_unchanged(self, tid: str, tensor: torch.Tensor) -> None:
        seen = self._const_seen.get(tid)
        if seen is None or seen[0] is None or _version_of(tensor) == seen[0]:
            return
        ctx, loc = seen[1], seen[2]
        where = (f"hook {ctx[0]!r} on {ctx[1]!r}" if ctx else "a hook") + \
            (f" at {loc[0]}:{loc[1]}" if loc else "")
        raise TraceError(
            f"a tensor that {where} used was edited in place afterwards, during the same "
            f"run: locally that hook computed with it as it was then, and a remote run "
            f"sends it once; .clone() it where the hook uses it, or edit a copy",
            hook=ctx[0] if ctx else None, site=ctx[1] if ctx else None,
            file=loc[0] if loc else None, line=loc[1] if loc else None)

    def constant_ids(self) -> list[str]:
        """What a graph's ``constants`` lists: attachments, then served parameters."""
        return list(self.constants) + sorted(self.parameter_refs)

    def differentiable_constants(self) -> list[tuple[str, torch.Tensor]]:
        """(id, the caller's own tensor) of the captured constants that still require grad
        (traced with autograd on: parameters, and what was computed from them), by id."""
        found = [(tid, t) for tid, t in self._const_by_obj.values() if t.requires_grad]
        return sorted(found, key=lambda item: int(item[0][1:]))

    def _lower(self, value):
        """Python/torch argument -> graph argument (Ref for proxies, Const for tensors)."""
        if isinstance(value, Proxy):
            return Ref(self.current(value))
        if isinstance(value, (Ref, Const)):
            return value
        if isinstance(value, torch.Tensor):
            return self.constant(value)
        if isinstance(value, torch.Size):
            return tuple(int(v) for v in value)
        if isinstance(value, (tuple, list)):
            lowered = [self._lower(v) for v in value]
            return tuple(lowered) if isinstance(value, tuple) else lowered
        if isinstance(value, (bool, int, float, str, slice, torch.dtype)) or value is None \
                or value is Ellipsis:
            if isinstance(value, slice):
                return slice(*(self._lower(v) for v in (value.start, value.stop, value.step)))
            return value
        if isinstance(value, np.ndarray):
            # An array (e.g. TL's pos_slice indices) indexes like a tensor: send it as one.
            return self.constant(self._keep(torch.from_numpy(np.array(value))))
        if isinstance(value, np.generic):
            return value.item()
        raise trace_error(f"an argument of type {type(value).__name__}",
                          "only tensors, numbers, slices, tuples/lists and dtypes can be "
                          "arguments of traced ops")

    def add_site(self, name: str, call: int) -> int:
        """List a site (in firing order) and return its index."""
        self.sites.append({"name": name, "call": call})
        return len(self.sites) - 1

    def read_site(self, name: str, call: int, shape, dtype, requires_grad: bool = False,
                  strides=None) -> Proxy:
        """A site's value. ``strides``: its activation's (hookwire.site_layout; None:
        contiguous), so that what depends on them (``contiguous()``, ``view``) traces as it
        runs."""
        node = self.emit(SITE_READ, (self.add_site(name, call),))
        meta = torch.empty(shape, dtype=dtype, device="meta") if strides is None else \
            torch.empty_strided(shape, strides, dtype=dtype, device="meta")
        return Proxy(self, node, meta, requires_grad and self.track_grad)

    def read_grad(self, index: int, shape, dtype) -> Proxy:
        """The gradient of the graph's ``backward`` value at site ``index``."""
        node = self.emit(SITE_GRAD, (index,))
        return Proxy(self, node, torch.empty(shape, dtype=dtype, device="meta"))

    def read_output(self, kind: str, shape, dtype) -> Proxy:
        """The forward's output (``logits`` or ``loss``), once the forward is over."""
        node = self.emit(OUTPUT_READ, (kind,))
        return Proxy(self, node, torch.empty(shape, dtype=dtype, device="meta"),
                     self.track_grad and torch.is_grad_enabled())

    def write_site(self, index: int, value, mode: str):
        if not isinstance(value, torch.Tensor):
            raise trace_error(f"returning a {type(value).__name__} from a hook",
                              "return a tensor of the activation's shape, or None")
        self.emit(SITE_WRITE, (index, value), {"mode": mode})

    def save(self, name: str, value: Proxy):
        if value.dtype not in DTYPE_NAMES:
            raise trace_error(f"keeping a {value.dtype} tensor after the run",
                              "complex values cannot be sent back; keep x.real and x.imag, "
                              "torch.view_as_real(x) or x.abs() instead")
        self.saves[name] = self.current(value)

    # ---- views and versions ---------------------------------------------------------------
    def current(self, p: Proxy) -> int:
        """The node holding p's value now (re-deriving a view whose base changed)."""
        if p._hw_tracer is not self:
            raise _dead_proxy_error(p._hw_tracer)
        view = p._hw_view
        if view is not None:
            base = view.base
            base_node = self.current(base)
            if base._hw_version != view.base_version:
                p._hw_node = view.redo(base_node)
                view.base_version = base._hw_version
                p._hw_version += 1
        return p._hw_node

    def _mutated(self, p: Proxy, node: int):
        p._hw_node = node
        p._hw_version += 1
        child = p
        while child._hw_view is not None:
            view = child._hw_view
            base = view.base
            base._hw_node = view.undo(self.current(base), child._hw_node)
            base._hw_version += 1
            view.base_version = base._hw_version
            child = base

    def _make_view(self, out: Proxy, base: Proxy, redo, undo, replay=None, key=None,
                   index=None, piece=None):
        inherited = base._hw_view.piece if base._hw_view is not None else None
        out._hw_view = _ViewOf(base, redo, undo, base._hw_version, replay, key, index,
                               piece or inherited)

    # ---- the torch-function entry point ---------------------------------------------------
    def handle(self, func, args, kwargs):
        if func is T.retain_grad:
            raise trace_error(_BLOCKED[func], "gradients of activations come back from "
                              "backward hooks: pass bwd_hooks=, or run_with_cache("
                              "incl_bwd=True) with return_type='loss' or metric=")
        if self.on_backward is not None and _is_backward(func):
            return self.on_backward(args[0], args[1:], kwargs)
        if self.on_register_hook is not None and func is T.register_hook:
            return self.on_register_hook(args[0], args[1] if len(args) > 1 else kwargs["hook"])
        if func in _BLOCKED or _is_backward(func):
            raise trace_error(_BLOCKED.get(func, "calling backward inside a hook"))
        if func in _DEVICE_MOVES:
            return args[0]
        if func is T.__iter__:
            rows = [args[0][i] for i in range(args[0].shape[0])]
            for row in rows:  # torch iterates with unbind(0): its rows are pieces
                if isinstance(row, Proxy) and row._hw_view is not None:
                    row._hw_view.piece = row._hw_view.piece or "for row in x"
            return iter(rows)
        if func in _CASTS:
            return self._cast(args[0], _CASTS[func])
        if func is T.to or func is T.type:
            return self._to(func, args, kwargs)
        if getattr(func, "__self__", None) is T.data:  # `x.data`: a fresh method-wrapper
            func = T.detach                             # each time, so never `is` a saved one
        if func is T.contiguous and (not isinstance(args[0], Proxy) or
                                     args[0]._hw_meta.is_contiguous()):
            return args[0]  # torch returns the tensor itself: later in-place edits reach it
        # (Not contiguous -- a transposed view: torch copies, and an edit of the copy must not
        # reach the activation; the registry's ``contiguous`` node below is that copy.)
        if func in _LOCAL_DRAWS or func in _LOCAL_FILLS or func in _DROPOUTS:
            return self._local_random(func, args, kwargs)
        if func in _VALUE_DRAWS:
            raise trace_error(f"`{_display_name(func)}` draws from a distribution that depends on "
                              "tensor values", f"use {_VALUE_DRAWS[func]} instead")
        if func is T.new_tensor:
            return self._new_tensor(args, kwargs)
        if "out" in kwargs and kwargs["out"] is not None:
            raise trace_error("an `out=` argument", "assign the result instead")
        # inplace=False (F.relu & co.) is the plain op; inplace=True stays and is refused.
        kwargs = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS and v is not None
                  and not (k == "inplace" and v is False)}
        name = CLIENT_OPS.get(func) or INPLACE_OPS.get(func)
        if name is not None and (name.startswith("new_") or name.endswith("_like")):
            kwargs = {k: v for k, v in kwargs.items() if k not in _PLACEMENT_KWARGS}
        if name == "scaled_dot_product_attention" and (kwargs.get("dropout_p") or (
                len(args) > 4 and args[4])):
            raise trace_error("`scaled_dot_product_attention` with dropout_p > 0",
                              "attention dropout draws random numbers inside the kernel; "
                              "compute softmax(q @ k.mT * scale) yourself and apply F.dropout "
                              "to it, or pass dropout_p=0.0")
        if func in INPLACE_OPS:
            return self._inplace(func, INPLACE_OPS[func], args, kwargs)
        name = CLIENT_OPS.get(func)
        if name is None:
            raise trace_error(f"`{_display_name(func)}`", unsupported_advice(func))
        if name == "einsum" and len(args) == 2 and isinstance(args[1], (list, tuple)):
            args = (args[0], *args[1])
        return self._functional(func, name, args, kwargs)

    def _meta(self, value, keep_indices: bool = False):
        if isinstance(value, Proxy):
            self.current(value)
            return value._hw_meta
        if isinstance(value, torch.Tensor):
            if keep_indices and value.dim() > 0 and value.dtype in _INDEX_DTYPES:
                return value  # index tensors stay real where masks decide shapes
            return value if value.dim() == 0 else torch.empty_like(value, device="meta")
        if isinstance(value, (tuple, list)):
            out = [self._meta(v, keep_indices) for v in value]
            return tuple(out) if isinstance(value, tuple) else out
        return value

    def _run_meta(self, fn, args, kwargs, what, data_dependent=False, twins=False):
        """(meta result, whether it aliases the first argument). Results are cached by the
        shapes and arguments involved: hooks repeat the same ops on every layer, and meta
        kernels of elementwise ops run through slow Python reference implementations.
        Local integer and bool tensors stay real only for indexing (``data_dependent``),
        where a mask's values decide the shape; elsewhere (``x * torch.arange(n)``) only
        their shape and dtype matter."""
        key = _meta_key(fn, args, kwargs, data_dependent)
        hit = _META_CACHE.get(key) if key is not None else None
        if hit is not None:
            specs, aliases = hit
            return _from_specs(specs), aliases
        keep = data_dependent
        try:
            first = self._meta(args[0], keep) if args else None
            margs = (first,) + tuple(self._meta(args[1:], keep)) if args else ()
            mkwargs = {k: self._meta(v, keep) for k, v in kwargs.items()}
            out = fn(*margs, **mkwargs)
            if twins:  # the real kernel's dtype rules, on one-element twins
                with torch._C.DisableTorchFunctionSubclass():
                    out = check_on_twins(fn, margs, mkwargs, out)
        except TraceError:
            raise
        except Exception as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if data_dependent and ("data-dependent" in text or "nonzero" in text or
                                   "meta" in text.lower()):
                raise trace_error(f"`{what}` here has a shape that depends on tensor values",
                                  "use torch.where(mask, x, 0) or index with real (local) "
                                  "masks instead of traced ones; for a traced position or "
                                  "token id (an argmax), x.index_select(dim, i.reshape(1)) "
                                  "or x.gather(dim, i)") from None
            if isinstance(exc, NotImplementedError) and "meta" in text.lower():
                raise trace_error(f"`{what}` with these arguments",
                                  f"torch cannot work out its result's shape without running "
                                  f"it ({text[:160]}); it is not supported in remote hooks") \
                    from None
            raise trace_error(f"`{what}` failed on these shapes ({text[:200]})",
                              "the same call would fail locally too") from None
        aliases = isinstance(out, torch.Tensor) and isinstance(first, torch.Tensor) and \
            _base_of(out) is _base_of(first)
        if key is not None and len(_META_CACHE) < 100_000:
            specs = _to_specs(out)
            if specs is not None:
                _META_CACHE[key] = (specs, aliases)
        return out, aliases

    def _wrap(self, meta_out, node: int, requires_grad: bool = False):
        if isinstance(meta_out, torch.Tensor):
            return Proxy(self, node, meta_out, requires_grad)
        if isinstance(meta_out, tuple):
            items = [Proxy(self, self.emit("tuple_get", (Ref(node), k)), m, requires_grad)
                     for k, m in enumerate(meta_out)]
            return type(meta_out)(items) if type(meta_out) is not tuple else tuple(items)
        raise trace_error("an op returning a non-tensor value")

    def _functional(self, func, name, args, kwargs):
        spec = OPS[name]
        if name in _INDEX_CHECKED:
            _check_local_index(name, args, kwargs)
        meta_out, aliases = self._run_meta(func, args, kwargs, _display_name(func),
                                           spec.data_dependent, spec.cost.twin_checked)
        node = self.emit(name, args, kwargs)
        self._check_signature(spec, func)
        out = self._wrap(meta_out, node, self._requires_grad(name, args, kwargs))
        src = args[0] if args else None
        self._note_nograd(name, src, args, kwargs, out, aliases)
        if isinstance(src, Proxy) and (name in _RESHAPE_VIEWS or name in _PERMUTE_VIEWS
                                       or name in _INDEX_VIEWS or name in _PIECE_OPS):
            self._track_view(name, src, args, kwargs, meta_out, out, aliases)
        elif isinstance(src, Proxy) and aliases and isinstance(out, Proxy):
            self._other_view(name, src, args, kwargs, out)
        return out

    def _check_signature(self, spec, func) -> None:
        """The node just recorded fits its op's signature in the registry, as the server's
        validator will check: refused here, at the hook's line, instead of by the server
        after the request was sent (naming only a node number)."""
        node = self.nodes[-1]
        where = f"node {node['id']}"
        reason = check_args(spec, tuple(decode_arg(a, where) for a in node["args"]),
                            {k: decode_arg(v, where) for k, v in node.get("kwargs", {}).items()})
        if reason is None:
            return
        advice = "call it without inplace instead, assigning the result (x = F.relu(x))" \
            if "'inplace'" in reason else "call it instead with the arguments hookwire's " \
            "registry takes (docs/ops.md)"
        raise trace_error(f"`{_display_name(func)}` called this way ({reason})", advice)

    @staticmethod
    def _note_nograd(name, src, args, kwargs, out, aliases) -> None:
        """Mark ``out`` (``_hw_nograd``) where torch would make it a tensor that does not
        require grad, so an in-place edit of a piece of it is not refused (_inplace): a
        ``detach``, a view or piece of such a tensor, a new tensor made under no_grad or only
        from such tensors. (A view made under no_grad of a tensor that requires grad is not:
        torch refuses to edit it in place too.)"""
        if name == "detach":
            nograd = True
        elif name in _PIECE_OPS or aliases:
            nograd = isinstance(src, Proxy) and src._hw_nograd
        elif not torch.is_grad_enabled():
            nograd = True
        else:
            nograd, stack = True, [args, tuple(kwargs.values())]
            while stack and nograd:
                for v in stack.pop():
                    if isinstance(v, Proxy):
                        nograd = nograd and v._hw_nograd
                    elif isinstance(v, torch.Tensor):
                        nograd = nograd and not v.requires_grad
                    elif isinstance(v, (tuple, list)):
                        stack.append(v)
        if not nograd:
            return
        for p in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(p, Proxy):
                p._hw_nograd = True

    def _requires_grad(self, name, args, kwargs) -> bool:
        """What autograd would say of an op's result (only with ``track_grad``)."""
        if not self.track_grad or name == "detach" or not torch.is_grad_enabled():
            return False
        stack = [args, tuple(kwargs.values())]
        while stack:
            for v in stack.pop():
                if isinstance(v, Proxy) and v.requires_grad:
                    return True
                if isinstance(v, (tuple, list)):
                    stack.append(v)
        return False

    def _track_view(self, name, src: Proxy, args, kwargs, meta_out, out, aliases):
        rest, kw = args[1:], dict(kwargs)
        if name in _PIECE_OPS:
            # Each piece is an index view of the source.
            dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
            if name == "unbind":
                dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            dim = dim % src.dim()
            start = 0
            for k, piece in enumerate(out):
                if name == "unbind":
                    index = (slice(None),) * dim + (k,)
                else:
                    length = piece.shape[dim]
                    index = (slice(None),) * dim + (slice(start, start + length),)
                    start += length
                self._index_view(src, piece, index, piece_of=name)
            return
        if not isinstance(meta_out, torch.Tensor) or not aliases and name != "detach":
            return  # the op copied (e.g. reshape of a non-viewable layout): not a view
        if name == "getitem":
            index = rest[0]
            if not _is_basic_index(index):
                return  # advanced indexing copies
            self._index_view(src, out, index)
        elif name == "select":
            dim, i = rest[0] % src.dim(), rest[1]
            self._index_view(src, out, (slice(None),) * dim + (i,))
        elif name == "narrow":
            dim, start, length = rest[0] % src.dim(), rest[1], rest[2]
            self._index_view(src, out, (slice(None),) * dim + (slice(start, start + length),))
        elif name in _RESHAPE_VIEWS:
            shape = tuple(src.shape)
            out_shape = tuple(out.shape)
            self._make_view(out, src,
                            redo=lambda b, name=name, rest=rest, kw=kw: self.emit(
                                OPS[name].name, (Ref(b), *rest), kw),
                            undo=lambda b, v, shape=shape: self.emit("reshape", (Ref(v), shape)),
                            replay=T.detach if name == "detach" else
                            functools.partial(_view_or_reshape, shape=out_shape),
                            key=("detach",) if name == "detach" else ("view", out_shape))
        else:  # permutations
            perm = _permutation_of(name, src.dim(), rest, kw)
            inverse = tuple(sorted(range(len(perm)), key=lambda i: perm[i]))
            self._make_view(out, src,
                            redo=lambda b, perm=perm: self.emit("permute", (Ref(b), perm)),
                            undo=lambda b, v, inv=inverse: self.emit("permute", (Ref(v), inv)),
                            replay=lambda t, perm=perm: t.permute(perm),
                            key=("permute", perm))

    def _other_view(self, name, src: Proxy, args, kwargs, out: Proxy):
        """Any other op whose result torch makes a view of its input (``diagonal``,
        ``expand``, ``unfold``, ``to`` or ``float()`` that change nothing...): re-derived from
        its base when the base is edited later (what torch's aliasing shows). An in-place
        edit of it reaches the base only where the view is the whole base, element for
        element (same shape, strides and dtype); any other is refused: the edit cannot be
        carried back, and dropping it silently would be a wrong answer."""
        rest, kw = args[1:], dict(kwargs)
        whole = out._hw_meta.shape == src._hw_meta.shape and \
            out._hw_meta.stride() == src._hw_meta.stride() and out.dtype == src.dtype

        def undo(b, v):
            if whole:
                return v
            raise trace_error(f"an in-place edit of the result of `{name}` (a view of its "
                              "input in torch: locally the edit reaches the input)",
                              "edit the input itself (index assignment, torch.where), or "
                              ".clone() the view first if the edit should stay in it")
        self._make_view(out, src,
                        redo=lambda b, name=name, rest=rest, kw=kw: self.emit(
                            OPS[name].name, (Ref(b), *rest), kw),
                        undo=undo)

    def _index_view(self, src, out, index, piece_of=None):
        # An index that keeps every element (TL's default pos_slice, x[0] of a batch of one)
        # can be replayed on the received value; a real slice is sent as itself.
        whole = out.numel() == src.numel() and not isinstance(index, torch.Tensor)
        self._make_view(out, src,
                        redo=lambda b, index=index: self.emit("getitem", (Ref(b), index)),
                        undo=lambda b, v, index=index: self.emit("setitem",
                                                                 (Ref(b), index, Ref(v))),
                        replay=(lambda t, index=index: t[index]) if whole else None,
                        key=("getitem", repr(index), tuple(out.shape)), index=index,
                        piece=piece_of)

    def _inplace(self, func, name, args, kwargs):
        target = args[0]
        if not isinstance(target, Proxy):
            raise trace_error("an in-place edit of a local tensor using traced values",
                              "build a new tensor instead (e.g. `x = x + act`)")
        piece = target._hw_view.piece if target._hw_view is not None else None
        if piece is not None and self.activations_require_grad and torch.is_grad_enabled() \
                and not target._hw_nograd:
            # Locally the activation requires grad, and autograd refuses to edit a piece of
            # a multi-output view in place (RuntimeError): remotely the edit would succeed.
            raise trace_error(
                f"`{_display_name(func)}` on a piece made by `{piece}` (locally torch raises: an "
                "output of a function that returns several views cannot be modified in "
                "place while autograd records the forward)",
                "index the activation itself (`x[0, :, :k] = 0`), build the new value "
                "out of place, or run under `torch.no_grad()` / "
                "`torch.set_grad_enabled(False)` as locally")
        _refuse_edit_of_shared_memory(target, func)
        if func is T.__setitem__:
            fargs = (target, args[1], args[2])
            _refuse_partial_overlap((target, args[1]), _region_of(args[2]))
        elif name == "copy" and len(args) > 1:
            fargs = tuple(args)
            _refuse_partial_overlap(_region_of(target), _region_of(args[1]))
        elif name == "zeros_like":
            fargs = (target,)
        else:
            fargs = tuple(args)
        # The in-place kernel itself, on twins, refuses what torch refuses in place.
        meta_out, _ = self._run_meta(OPS[name].fn, fargs, kwargs, _display_name(func),
                                     OPS[name].data_dependent)
        if OPS[name].cost.twin_checked and func is not T.__setitem__:
            try:
                with torch._C.DisableTorchFunctionSubclass():
                    check_on_twins(func, tuple(self._meta(a) for a in fargs),
                                   {k: self._meta(v) for k, v in kwargs.items()}, meta_out)
            except Exception as exc:
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise trace_error(f"`{_display_name(func)}` failed on these dtypes "
                                  f"({text[:200]})", "the same edit fails locally") from None
        if tuple(meta_out.shape) != tuple(target.shape):
            raise trace_error(f"`{_display_name(func)}` would change the shape of the tensor it "
                              "edits in place", "the same edit fails locally")
        node = self.emit(name, fargs, kwargs)
        if meta_out.dtype != target.dtype:
            if not torch.can_cast(meta_out.dtype, target.dtype):
                raise trace_error(f"`{_display_name(func)}` would store {meta_out.dtype} in a "
                                  f"{target.dtype} tensor", "the same edit fails locally")
            node = self.emit("to", (Ref(node), target.dtype))
        self._mutated(target, node)
        return None if func is T.__setitem__ else target

    def random(self, op: str, like: Proxy, seed: int, dtype=None) -> Proxy:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
            raise trace_error(f"seed {seed!r}", "seeds are ints in [0, 2**63)")
        dtype = dtype or like.dtype
        kwargs = {"seed": seed, "dtype": dtype}
        node = self.emit(op, (like,), kwargs)
        return Proxy(self, node, torch.empty(like.shape, dtype=dtype, device="meta"))

    def _local_random(self, func, args, kwargs):
        """``torch.randn_like(act)``, ``act.normal_()``, ``F.dropout(act, p)`` & co: the
        draw does not depend on the activation's values, only on its shape, dtype and
        layout, which are known here. So it is drawn here, from the caller's generator
        (torch's global one unless ``generator=`` says otherwise), with the same call a
        local run on CPU makes -- same numbers, same RNG state after the run -- and sent
        as a constant. (``hookwire.randn_like(x, seed)`` draws on the server instead: no
        upload, the same numbers locally and remotely, but not torch's.)"""
        like = args[0]
        if not isinstance(like, Proxy):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        self.caller_draws += 1
        if func in _DROPOUTS:
            return self._dropout(func, like, args, kwargs)
        template = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype)
        if func in _LOCAL_DRAWS:
            return func(template, *args[1:], **kwargs)  # a real tensor: a constant when used
        func(template, *args[1:], **kwargs)  # the in-place fill, drawn here
        self._mutated(like, self.emit("copy", (like, template)))
        return like

    def _dropout(self, func, x: Proxy, args, kwargs):
        names = ("input", "p", "training", "inplace")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        p = bound.get("p", 0.5)
        training = bound.get("training", bound.get("train", True))
        if func is torch.dropout:
            training = args[2] if len(args) > 2 else kwargs.get("train", True)
        if not training or p == 0:
            return x  # torch returns its input unchanged
        # Dropout is the input times a mask scaled by 1/(1-p), drawn from the shape alone;
        # applied to ones, torch returns exactly that mask (1 * m == m), with the same draws.
        ones = torch.ones(x.shape, dtype=x.dtype)
        with torch._C.DisableTorchFunctionSubclass():
            mask = func(ones, p, True) if func is torch.dropout else func(ones, p=p,
                                                                          training=True)
        node = self.emit("mul", (x, mask))
        if bound.get("inplace"):
            self._mutated(x, node)
            return x
        return Proxy(self, node, torch.empty(x.shape, dtype=x.dtype, device="meta"))

    def _new_tensor(self, args, kwargs):
        """``x.new_tensor(data)``: a tensor from data, with x's dtype unless told."""
        like, data = args[0], args[1] if len(args) > 1 else kwargs.get("data")
        dtype = kwargs.get("dtype") or like.dtype
        if isinstance(data, Proxy) or (isinstance(data, (list, tuple)) and any(
                isinstance(v, Proxy) for v in data)):
            raise trace_error("`Tensor.new_tensor` of a traced tensor",
                              "use x.detach().clone().to(dtype), or torch.stack")
        return torch.tensor(data, dtype=dtype)

    def _cast(self, p, dtype):
        if p.dtype == dtype:
            return p  # torch returns the tensor itself
        node = self.emit("to", (p, dtype))
        out = Proxy(self, node, torch.empty(p.shape, dtype=dtype, device="meta"),
                    p.requires_grad and torch.is_grad_enabled())
        out._hw_nograd = p._hw_nograd or not torch.is_grad_enabled() or \
            not (dtype.is_floating_point or dtype.is_complex)  # (a new tensor, as torch's)
        return out

    def _to(self, func, args, kwargs):
        p = args[0]
        dtype = kwargs.get("dtype")
        for a in args[1:]:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, torch.Tensor):
                dtype = a.dtype
        if func is T.type and dtype is None and len(args) == 1 and not kwargs:
            with torch._C.DisableTorchFunctionSubclass():
                return T.type(p)
        if dtype is None:
            return p
        return self._cast(p, dtype)

    # ---- after tracing --------------------------------------------------------------------
    def escaped(self, exclude_ids=()) -> list[Proxy]:
        """Proxies the user's code still references (stored in dicts, lists, closures...)."""
        children: dict[int, int] = {}
        for ref in self.created:
            p = ref()
            if p is not None and p._hw_view is not None:
                children[id(p._hw_view.base)] = children.get(id(p._hw_view.base), 0) + 1
            del p
        out = []
        for ref in self.created:
            p = ref()
            if p is None or id(p) in exclude_ids:
                continue
            # getrefcount counts its argument and our local name: 2.
            users = sys.getrefcount(p) - 2 - children.get(id(p), 0)
            if users > 0:
                self.user_refs[id(p)] = users  # what rebind must replace (hookwire.rebind)
                out.append(p)
            del p
        return out


_META_CACHE: dict = {}
_INDEX_DTYPES = (torch.bool, torch.int64, torch.int32, torch.uint8)


_SCALAR_TYPES = frozenset((int, float, bool, str, type(None), type(Ellipsis), torch.dtype))


def _key_of(value):
    t = type(value)
    if t is Proxy:
        return value._hw_key
    if t in _SCALAR_TYPES:
        return (t, value)
    if t is tuple or t is torch.Size:
        return ("t",) + tuple([_key_of(v) for v in value])
    if t is slice:
        return ("s", _key_of(_bound(value.start)), _key_of(_bound(value.stop)),
                _key_of(_bound(value.step)))
    if t is list:
        return ("l",) + tuple([_key_of(v) for v in value])
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype, tuple(value.stride()))
    raise _Uncacheable


class _Uncacheable(Exception):
    pass


# Ops whose registry kernel refuses indices out of range (hookwire.ops.check_index_range), all
# spelled (x, dim, index, ...). A local index tensor is checked while tracing: the meta run
# sees no values, and the server would refuse the same index only after the request was sent.
_INDEX_CHECKED = {"gather", "index_select", "scatter", "scatter_add", "scatter_reduce",
                  "index_add"}


def _check_local_index(name, args, kwargs):
    x = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    index = args[2] if len(args) > 2 else kwargs.get("index")
    if not isinstance(x, Proxy) or isinstance(index, Proxy) or not isinstance(dim, int):
        return
    try:
        check_index_range(index, _size_of(x._hw_meta, dim), name, negative=False)
    except IndexError as exc:
        raise trace_error(f"`{name}` with an index out of range ({exc})",
                          "the same call fails locally too (torch raises): "
                          "index inside the tensor's shape") from None


def _size_of(meta, dim: int) -> int:
    return meta.shape[dim % meta.dim()] if meta.dim() else 1


def _meta_key(fn, args, kwargs, data_dependent=False):
    if data_dependent:
        return None  # real index tensors: their values decide shapes
    try:
        return (fn, _key_of(args), _key_of(tuple(kwargs.items())) if kwargs else ())
    except (_Uncacheable, TypeError):
        return None


def _to_specs(out):
    if isinstance(out, torch.Tensor):
        return ("T", tuple(out.shape), tuple(out.stride()), out.dtype)
    if isinstance(out, tuple):
        items = [_to_specs(o) for o in out]
        if any(i is None or i[0] != "T" for i in items):
            return None
        return ("tuple", type(out), tuple(items))
    return None


def _from_specs(specs):
    if specs[0] == "T":
        return torch.empty_strided(specs[1], specs[2], dtype=specs[3], device="meta")
    items = [_from_specs(s) for s in specs[2]]
    return specs[1](items) if specs[1] is not tuple else tuple(items)


def _view_or_reshape(t: torch.Tensor, shape) -> torch.Tensor:
    """A reshape view replayed on a received tensor (contiguous, so a view almost always
    works; where strides differ from the traced layout, a reshape gives the same values)."""
    try:
        return t.view(shape)
    except RuntimeError:
        return t.reshape(shape)


def _is_basic_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, slice) or
               (isinstance(i, int) and not isinstance(i, bool)) for i in items)


def _permutation_of(name, ndim, rest, kw) -> tuple[int, ...]:
    """Which source dim each output dim comes from, by running the op on distinct sizes."""
    sizes = tuple(range(2, 2 + ndim))
    probe = torch.empty(sizes, device="meta")
    fn = {"transpose": torch.transpose, "swapaxes": torch.swapaxes, "swapdims": torch.swapdims,
          "permute": T.permute, "movedim": torch.movedim, "t": torch.t,
          "T": lambda x: x.T, "mT": lambda x: x.mT}[name]
    out_shape = fn(probe, *rest, **kw).shape
    return tuple(sizes.index(s) for s in out_shape)


class tracing:
    """Context manager: this thread is tracing with ``tracer`` (turns on the I/O guard)."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer

    def __enter__(self):
        self._prev = (getattr(_STATE, "tracer", None), getattr(_STATE, "tracing", False))
        _STATE.tracer, _STATE.tracing = self.tracer, True
        return self.tracer

    def __exit__(self, *exc):
        _STATE.tracer, _STATE.tracing = self._prev
        return False


__all__ = ["Proxy", "Tracer", "tracing", "trace_error", "user_location", "library_dirs"]
