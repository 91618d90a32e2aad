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

from hookwire.errors import HookwireError, TraceError
from hookwire.frames import DTYPE_NAMES
from hookwire.graph import Const, Ref, encode_arg
from hookwire.ops import CLIENT_OPS, INPLACE_OPS, OPS

T = torch.Tensor
_STATE = threading.local()

# Metadata a hook may read freely: it is known without the values.
_METADATA_NAMES = (
    "shape", "size", "dim", "ndim", "ndimension", "numel", "nelement", "dtype", "device",
    "is_cuda", "requires_grad", "layout", "stride", "is_contiguous", "__len__",
    "element_size", "is_floating_point", "is_complex", "get_device", "is_meta", "__hash__",
    "is_leaf", "grad_fn", "is_sparse", "is_quantized", "is_nested", "is_mps",
    "storage_offset", "itemsize", "nbytes", "is_inference", "output_nr", "grad")
_METADATA = set()
for _n in _METADATA_NAMES:
    _attr = T.__dict__.get(_n) if _n in T.__dict__ else getattr(torch._C.TensorBase, _n, None)
    if _attr is None:
        continue
    _METADATA.add(_attr.__get__ if hasattr(_attr, "__get__") and not callable(
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

_RANDOM_FUNCS = {torch.randn_like, torch.rand_like, T.normal_, T.uniform_}
_RESHAPE_VIEWS = {"view", "reshape", "view_as", "reshape_as", "flatten", "unflatten",
                  "squeeze", "unsqueeze", "detach", "contiguous"}
_PERMUTE_VIEWS = {"transpose", "swapaxes", "swapdims", "permute", "movedim", "t", "T", "mT"}
_INDEX_VIEWS = {"getitem", "select", "narrow"}
_PIECE_OPS = {"unbind", "split", "chunk"}
_DROP_KWARGS = {"_stacklevel", "memory_format", "non_blocking", "copy"}

_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch,)) + (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def _extra_library_dirs():
    dirs = list(_LIBRARY_DIRS)
    for name in ("transformer_lens", "einops", "functools", "hookwire"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None):
            path = os.path.dirname(os.path.abspath(mod.__file__))
            dirs.append(path + os.sep if name != "functools" else mod.__file__)
    return tuple(dirs)


def user_location() -> tuple[str, int] | None:
    """The innermost stack frame that belongs to the user's code, as (file, line)."""
    dirs = _extra_library_dirs()
    frame = sys._getframe(1)
    while frame is not None:
        fname = os.path.abspath(frame.f_code.co_filename)
        if not fname.startswith(dirs) and not fname.startswith("<frozen"):
            return frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back
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
                          "a hook runs once on your machine while tracing, not at each "
                          "forward on the server. Do I/O after the run, on the returned tensors")
    finally:
        _STATE.tracing = True
    raise err


def _caused_by_user_code() -> bool:
    """True unless the I/O happens while a module is being imported (torch imports parts of
    itself lazily, e.g. while computing a meta shape, and those imports may create cache
    folders). Nothing else runs during tracing but the user's hooks and our pure code."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
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
                              "a hook runs once on your machine while tracing, not at each "
                              "forward on the server. Save the returned tensors after the run")
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
    __slots__ = ("base", "redo", "undo", "base_version", "replay", "key")

    def __init__(self, base, redo, undo, base_version, replay=None, key=None):
        self.base, self.redo, self.undo, self.base_version = base, redo, undo, base_version
        self.replay = replay
        self.key = key  # what view of the base this is (equal keys: equal values)


class Proxy(torch.Tensor):
    @staticmethod
    def __new__(cls, tracer: "Tracer", node: int, meta: torch.Tensor):
        p = torch.Tensor._make_wrapper_subclass(
            cls, meta.shape, strides=meta.stride(), dtype=meta.dtype, device="cpu",
            requires_grad=False)
        p._hw_tracer = tracer
        p._hw_node = node
        p._hw_meta = meta
        p._hw_view = None
        p._hw_version = 0
        p._hw_key = ("T", tuple(meta.shape), meta.dtype, tuple(meta.stride()))
        tracer.created.append(weakref.ref(p))
        return p

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        tracer = _find_tracer(args, kwargs)
        if tracer.closed:
            raise _dead_proxy_error()
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


def _dead_proxy_error() -> HookwireError:
    """A Proxy left over from another trace (kept in hook.ctx or a dict by a run that failed)
    has no value: using it must fail loudly, never turn into a reference to a wrong node."""
    return HookwireError("this tensor was stored by a hook during a remote run that failed, "
                         "so it never received a value; rerun the call that produces it")


def _bound(value):
    """A slice bound that is a real 0-d integer tensor (``x[..., :dim_tensor]``) means its
    value, as it does to torch; proxies and plain ints pass through."""
    if isinstance(value, torch.Tensor) and not isinstance(value, Proxy) and value.dim() == 0 \
            and not value.is_floating_point() and value.device.type != "meta":
        return int(value)
    return value


def _func_name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _base_of(meta: torch.Tensor):
    return meta._base if meta._base is not None else meta


class Tracer:
    """Records one request's graph: nodes, constants, sites, saves."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.constants: dict[str, torch.Tensor] = {}
        self._const_by_obj: dict[int, str] = {}
        self.sites: list[dict] = []
        self.saves: dict[str, int] = {}
        self.backward: int | None = None  # node to differentiate after the forward
        self.created: list[weakref.ref] = []
        self.context: tuple[str, str] | None = None
        self._next = 0
        self._kept: list = []
        self.closed = False  # set when the run failed: its proxies have no value, ever
        self.user_refs: dict[int, int] = {}  # escaped proxy id -> references user code holds

    # ---- recording ------------------------------------------------------------------------
    def emit(self, op: str, args: tuple = (), kwargs: dict | None = None) -> int:
        nid = self._next
        self._next += 1
        node = {"id": nid, "op": op, "args": [self._encode(a) for a in args]}
        if kwargs:
            node["kwargs"] = {k: self._encode(v) for k, v in kwargs.items()}
        self.nodes.append(node)
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

    def constant(self, tensor: torch.Tensor) -> Const:
        # Keyed by identity; the entry keeps the object alive so its id cannot be reused
        # by a later temporary tensor.
        entry = self._const_by_obj.get(id(tensor))
        tid = entry[0] if entry is not None and entry[1] is tensor else None
        if tid is None:
            if tensor.device.type == "meta":
                raise trace_error("a tensor with no data (meta device), such as a weight of a "
                                  "weightless remote model,", "read weights on the server by "
                                  "hooking the site that uses them, or pass real tensors")
            if tensor.dtype not in DTYPE_NAMES:
                raise trace_error(f"a captured tensor of dtype {tensor.dtype}",
                                  "use one of " + ", ".join(map(str, DTYPE_NAMES)))
            tid = f"c{len(self.constants)}"
            self.constants[tid] = tensor.detach()
            self._const_by_obj[id(tensor)] = (tid, tensor)
        return Const(tid)

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

    def read_site(self, name: str, call: int, shape, dtype) -> Proxy:
        node = self.emit("site.read", (self.add_site(name, call),))
        return Proxy(self, node, torch.empty(shape, dtype=dtype, device="meta"))

    def read_grad(self, index: int, shape, dtype) -> Proxy:
        """The gradient of the graph's ``backward`` value at site ``index``."""
        node = self.emit("site.grad", (index,))
        return Proxy(self, node, torch.empty(shape, dtype=dtype, device="meta"))

    def read_output(self, kind: str, shape, dtype) -> Proxy:
        """The forward's output (``logits`` or ``loss``), once the forward is over."""
        node = self.emit("output.read", (kind,))
        return Proxy(self, node, torch.empty(shape, dtype=dtype, device="meta"))

    def write_site(self, index: int, value, mode: str):
        if not isinstance(value, torch.Tensor):
            raise trace_error(f"returning a {type(value).__name__} from a hook",
                              "return a tensor of the activation's shape, or None")
        self.emit("site.write", (index, value), {"mode": mode})

    def save(self, name: str, value: Proxy):
        self.saves[name] = self.current(value)

    # ---- views and versions ---------------------------------------------------------------
    def current(self, p: Proxy) -> int:
        """The node holding p's value now (re-deriving a view whose base changed)."""
        if p._hw_tracer is not self:
            raise _dead_proxy_error()
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

    def _make_view(self, out: Proxy, base: Proxy, redo, undo, replay=None, key=None):
        out._hw_view = _ViewOf(base, redo, undo, base._hw_version, replay, key)

    # ---- the torch-function entry point ---------------------------------------------------
    def handle(self, func, args, kwargs):
        if func is T.retain_grad:
            raise trace_error(_BLOCKED[func], "gradients of activations come back from "
                              "backward hooks: pass bwd_hooks=, or run_with_cache("
                              "incl_bwd=True) with return_type='loss' or metric=")
        if func in _BLOCKED:
            raise trace_error(_BLOCKED[func])
        if func in _DEVICE_MOVES:
            return args[0]
        if func is T.__iter__:
            return iter([args[0][i] for i in range(args[0].shape[0])])
        if func in _CASTS:
            return self._cast(args[0], _CASTS[func])
        if func is T.to or func is T.type:
            return self._to(func, args, kwargs)
        if func is T.data.__get__:
            func = T.detach
        if func is T.contiguous:
            return args[0]
        if func in _RANDOM_FUNCS:
            return self._unseeded_random(func, args, kwargs)  # proxies are laid out contiguously: torch returns self
        if "out" in kwargs and kwargs["out"] is not None:
            raise trace_error("an `out=` argument", "assign the result instead")
        # inplace=False (F.relu & co.) is the plain op; inplace=True stays and is refused.
        kwargs = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS and v is not None
                  and not (k == "inplace" and v is False)}
        if func in INPLACE_OPS:
            return self._inplace(func, INPLACE_OPS[func], args, kwargs)
        name = CLIENT_OPS.get(func)
        if name is None:
            raise trace_error(f"`{_func_name(func)}`",
                              "it is not in hookwire's registry of allowed operations "
                              "(see hookwire.ops.OPS)")
        if name == "einsum" and len(args) == 2 and isinstance(args[1], (list, tuple)):
            args = (args[0], *args[1])
        return self._functional(func, name, args, kwargs)

    def _meta(self, value):
        if isinstance(value, Proxy):
            self.current(value)
            return value._hw_meta
        if isinstance(value, torch.Tensor):
            if value.dtype in (torch.bool, torch.int64, torch.int32, torch.uint8) \
                    and value.dim() > 0:
                return value  # index tensors stay real: masks decide shapes
            return value if value.dim() == 0 else torch.empty_like(value, device="meta")
        if isinstance(value, (tuple, list)):
            out = [self._meta(v) for v in value]
            return tuple(out) if isinstance(value, tuple) else out
        return value

    def _run_meta(self, fn, args, kwargs, what):
        """(meta result, whether it aliases the first argument). Results are cached by the
        shapes and arguments involved: hooks repeat the same ops on every layer, and meta
        kernels of elementwise ops run through slow Python reference implementations."""
        key = _meta_key(fn, args, kwargs)
        hit = _META_CACHE.get(key) if key is not None else None
        if hit is not None:
            specs, aliases = hit
            return _from_specs(specs), aliases
        try:
            first = self._meta(args[0]) if args else None
            out = fn(*((first,) + tuple(self._meta(args[1:]))) if args else (),
                     **{k: self._meta(v) for k, v in kwargs.items()})
        except TraceError:
            raise
        except Exception as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "data-dependent" in text or "nonzero" in text or "meta" in text.lower():
                raise trace_error(f"`{what}` here has a shape that depends on tensor values",
                                  "use torch.where(mask, x, 0) or index with real (local) "
                                  "masks instead of traced ones") from None
            raise trace_error(f"`{what}` failed on these shapes ({text[:200]})",
                              "the same call would fail locally too") from None
        aliases = isinstance(out, torch.Tensor) and isinstance(first, torch.Tensor) and \
            _base_of(out) is _base_of(first)
        if key is not None and len(_META_CACHE) < 100_000:
            specs = _to_specs(out)
            if specs is not None:
                _META_CACHE[key] = (specs, aliases)
        return out, aliases

    def _wrap(self, meta_out, node: int):
        if isinstance(meta_out, torch.Tensor):
            return Proxy(self, node, meta_out)
        if isinstance(meta_out, tuple):
            items = [Proxy(self, self.emit("tuple_get", (Ref(node), k)), m)
                     for k, m in enumerate(meta_out)]
            return type(meta_out)(items) if type(meta_out) is not tuple else tuple(items)
        raise trace_error("an op returning a non-tensor value")

    def _functional(self, func, name, args, kwargs):
        meta_out, aliases = self._run_meta(func, args, kwargs, _func_name(func))
        node = self.emit(name, args, kwargs)
        out = self._wrap(meta_out, node)
        src = args[0] if args else None
        if isinstance(src, Proxy) and (name in _RESHAPE_VIEWS or name in _PERMUTE_VIEWS
                                       or name in _INDEX_VIEWS or name in _PIECE_OPS):
            self._track_view(name, src, args, kwargs, meta_out, out, aliases)
        return out

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
                self._index_view(src, piece, index)
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

    def _index_view(self, src, out, index):
        # An index that keeps every element (TL's default pos_slice, x[0] of a batch of one)
        # can be replayed on the received value; a real slice is sent as itself.
        whole = out.numel() == src.numel() and not isinstance(index, torch.Tensor)
        self._make_view(out, src,
                        redo=lambda b, index=index: self.emit("getitem", (Ref(b), index)),
                        undo=lambda b, v, index=index: self.emit("setitem",
                                                                 (Ref(b), index, Ref(v))),
                        replay=(lambda t, index=index: t[index]) if whole else None,
                        key=("getitem", repr(index), tuple(out.shape)))

    def _inplace(self, func, name, args, kwargs):
        target = args[0]
        if not isinstance(target, Proxy):
            raise trace_error("an in-place edit of a local tensor using traced values",
                              "build a new tensor instead (e.g. `x = x + act`)")
        if func is T.__setitem__:
            fargs = (target, args[1], args[2])
        elif name == "zeros_like":
            fargs = (target,)
        else:
            fargs = tuple(args)
        meta_out, _ = self._run_meta(OPS[name].fn, fargs, kwargs, _func_name(func))
        if tuple(meta_out.shape) != tuple(target.shape):
            raise trace_error(f"`{_func_name(func)}` would change the shape of the tensor it "
                              "edits in place", "the same edit fails locally")
        node = self.emit(name, fargs, kwargs)
        if meta_out.dtype != target.dtype:
            if not torch.can_cast(meta_out.dtype, target.dtype):
                raise trace_error(f"`{_func_name(func)}` would store {meta_out.dtype} in a "
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

    def _unseeded_random(self, func, args, kwargs):
        """torch.randn_like(act) & co: a seed from the caller's RNG, so torch.manual_seed
        makes remote runs reproducible (the draws differ from a local randn_like's)."""
        like = args[0]
        gen = kwargs.get("generator")
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen).item())
        op = "rand_like" if func in (torch.rand_like, T.uniform_) else "randn_like"
        if func in (T.normal_, T.uniform_):
            if len(args) > 1 or set(kwargs) - {"generator"}:
                raise trace_error(f"`{_func_name(func)}` with parameters",
                                  "use hookwire.randn_like(x, seed) * std + mean instead")
            self._mutated(like, self.random(op, like, seed)._hw_node)
            return like
        if len(args) > 1 or set(kwargs) - {"generator", "dtype"}:
            raise trace_error(f"`{_func_name(func)}` with extra arguments",
                              "use hookwire.randn_like(x, seed, dtype)")
        return self.random(op, like, seed, kwargs.get("dtype"))

    def _cast(self, p, dtype):
        if p.dtype == dtype:
            return p  # torch returns the tensor itself
        node = self.emit("to", (p, dtype))
        return Proxy(self, node, torch.empty(p.shape, dtype=dtype, device="meta"))

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
        if value.dim() > 0 and value.dtype in (torch.bool, torch.int64, torch.int32,
                                               torch.uint8):
            raise _Uncacheable  # real index tensors: their values decide shapes
        return ("T", tuple(value.shape), value.dtype, tuple(value.stride()))
    raise _Uncacheable


class _Uncacheable(Exception):
    pass


def _meta_key(fn, args, kwargs):
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


__all__ = ["Proxy", "Tracer", "tracing", "trace_error", "user_location"]
