"""What a forward holds on the shared model where it gives way (not a test module itself).

A long forward lets light requests of other users run nested in it (server/give_way.py): at
each block's pre-hook, after each attention give-way point (``ModelEntry.attention_points``,
``hf_attention_points``) and, in a TL forward, at its own sites there (``block_sites``,
``attention_sites``). A nested forward sees everything the interrupted one keeps on the
modules at that moment. :func:`audit` runs a served family's forwards the way the worker
does (``ModelWorker._forward``) with a hook at every such point, and diffs the state of every
module reachable from the model (the bridge, the HF model inside it, the plain HF tree
module sites run in, and modules held only in a module's ``__dict__``) against a snapshot
taken while the model was idle: whatever was set, changed, deleted or mutated in place there
is per-forward state a nested request would read or clobber.

The idle snapshot is taken after a warm-up forward of another sequence length, so a cache a
forward fills for its own length (a rotary table, say) shows up too, as changed.
"""
from __future__ import annotations

import enum
import types
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from hookwire.server.cancel_watch import block_modules
from hookwire.server.worker import ModelWorker

# torch.nn.Module's own bookkeeping: the weights and the tree (shared by design), and the
# hook dicts (every forward's hooks are owned per forward: module_sites.owned_by).
IGNORED = frozenset({
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_is_full_backward_hook", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
})
_PLAIN = (type(None), bool, int, float, complex, str, bytes, type, enum.Enum, torch.dtype,
          torch.device, torch.Size)
DEPTH = 3


class _Fingerprints:
    """Comparable summaries of values: a tensor by identity and version counter (an
    in-place write counts), a container by its items, another object by identity and (a
    few levels deep) its own ``__dict__``. Every value summarised is kept alive, so an id
    is never reused within one audit."""

    def __init__(self):
        self.keep: list = []
        self._objects: dict = {}

    def of(self, value, depth: int = DEPTH):
        if isinstance(value, _PLAIN):
            return ("v", type(value), value if value == value else repr(value))
        self.keep.append(value)
        if isinstance(value, torch.Tensor):
            return ("t", id(value), value._version)
        if isinstance(value, torch.nn.Module):
            return ("m", id(value))
        if isinstance(value, types.MethodType):
            return ("bound", id(value.__self__), id(value.__func__))
        if callable(value) and not hasattr(value, "__dict__") or \
                isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
            return ("f", id(value))
        if depth <= 0:
            return ("id", id(value))
        if isinstance(value, (list, tuple)):
            return (type(value), id(value), tuple(self.of(v, depth - 1) for v in value))
        if isinstance(value, dict):
            return (type(value), id(value), tuple((self.of(k, depth - 1), self.of(v, depth - 1))
                                                  for k, v in list(value.items())))
        if isinstance(value, (set, frozenset)):
            return (type(value), id(value), frozenset(self.of(v, depth - 1) for v in value))
        state = getattr(value, "__dict__", None)
        if not isinstance(state, dict):
            return ("o", type(value), id(value))
        key = (id(value), depth)
        if key not in self._objects:   # (configs are shared by every module)
            self._objects[key] = ("o", type(value), id(value), tuple(
                (k, self.of(v, depth - 1)) for k, v in list(state.items())))
        return self._objects[key]


def reachable_modules(roots: dict) -> dict:
    """id -> (name, module) of every module under ``roots`` (name -> module), children and
    modules held in a module's ``__dict__`` (TL's ``original_component``), first name wins."""
    found: dict = {}
    queue = [(name, m) for name, m in roots.items() if m is not None]
    while queue:
        name, module = queue.pop(0)
        if id(module) in found:
            continue
        found[id(module)] = (name, module)
        queue += [(f"{name}.{k}", c) for k, c in module._modules.items() if c is not None]
        for k, v in vars(module).items():
            if isinstance(v, torch.nn.Module):
                queue.append((f"{name}.{k}", v))
            elif isinstance(v, (list, tuple)):
                queue += [(f"{name}.{k}[{i}]", c) for i, c in enumerate(v)
                          if isinstance(c, torch.nn.Module)]
    return found


def snapshot(modules: dict, fp: _Fingerprints) -> dict:
    return {(mid, k): fp.of(v) for mid, (_, m) in modules.items()
            for k, v in list(vars(m).items()) if k not in IGNORED}


def diff(idle: dict, now: dict) -> dict:
    """(module id, attribute) -> "set" / "changed" / "deleted"."""
    out = {}
    for key in idle.keys() | now.keys():
        if key not in idle:
            out[key] = "set"
        elif key not in now:
            out[key] = "deleted"
        elif idle[key] != now[key]:
            out[key] = "changed"
    return out


@dataclass
class Finding:
    """One attribute of one module class that differs from idle at a give-way point."""
    cls: str
    attr: str
    kinds: set = field(default_factory=set)      # set / changed / deleted
    points: set = field(default_factory=set)     # where (the forward's kind, the point)
    modules: set = field(default_factory=set)    # module paths
    persists: bool = False                       # still differs once the forward is over

    def describe(self) -> str:
        points = sorted(self.points)
        return (f"{self.cls}.{self.attr} ({'/'.join(sorted(self.kinds))}"
                f"{', persists' if self.persists else ''}) on {len(self.modules)} module(s) "
                f"e.g. {sorted(self.modules)[0]}, at {len(points)} point(s) e.g. {points[0]}")


def forwards(entry, device, start_at_layer=None) -> list:
    """(label, model watched, its attention points, its site hook points, forward maker) of
    each forward the worker lets give way: TL's (when its hook points are served) and the
    plain HF forward module sites run in, each with and without an attention mask (a
    request's own ``attention_mask`` input: left-padded rows). ``start_at_layer``: the TL
    forwards start at that block from a random residual instead (such forwards never give
    way: for the audit's own test)."""
    out = []
    spec = SimpleNamespace(output_attentions=False, start_at_layer=start_at_layer,
                           tl_flags=(), return_type="logits", loss_per_token=False)

    def maker(on_modules, masked):
        def make(tokens):
            mask = residual = None
            if masked:
                mask = torch.ones_like(tokens)
                mask[0, :2] = 0
            if start_at_layer is not None and not on_modules:
                residual = torch.randn(*tokens.shape, entry.hosted.bridge.cfg.d_model,
                                       generator=torch.Generator().manual_seed(0))
                residual = residual.to(device, entry.hosted.dtype)
            return ModelWorker._forward(entry, spec, tokens.to(device), on_modules=on_modules,
                                        mask=None if mask is None else mask.to(device),
                                        residual=residual)
        return make

    bridge = entry.hosted.bridge if entry.tl_refused is None else None
    if entry.tl_forward_state is not None and start_at_layer is None:
        bridge = None  # (its TL forward never gives way: ModelWorker._forward_may_give_way)
    if bridge is not None:
        sites = {id(entry.site_modules[n]): (n, entry.site_modules[n])
                 for n in entry.block_sites | entry.attention_sites}
        for masked in (False, True):
            out.append((f"tl{'+mask' if masked else ''}", bridge, entry.attention_points,
                        list(sites.values()), maker(False, masked)))
    if entry.hf_model is not None:
        for masked in (False, True):
            out.append((f"hf{'+mask' if masked else ''}", entry.hf_model,
                        entry.hf_attention_points, [], maker(True, masked)))
    return out


def audit(entry, device="cpu", batch=2, warm_len=5, seq=7, vocab=250,
          start_at_layer=None) -> dict:
    """(class, attribute) -> Finding for every per-forward attribute seen at a give-way
    point of any of the family's forwards (``forwards``)."""
    hosted = entry.hosted
    roots = {"bridge": hosted.bridge, "model": hosted.original, "plain": entry.hf_model}
    gen = torch.Generator().manual_seed(0)
    findings: dict = {}
    for label, watched, attention, sites, make in forwards(entry, device,
                                                            start_at_layer):
        modules = reachable_modules(roots)
        fp = _Fingerprints()
        with torch.no_grad():
            make(torch.randint(3, vocab, (batch, warm_len), generator=gen))()
        idle = snapshot(modules, fp)
        names = {id(m): n for n, m in reachable_modules({"": watched}).values()}

        def checker(where):
            def check(module, args, output=None):
                for (mid, attr), kind in diff(idle, snapshot(modules, fp)).items():
                    path, m = modules[mid]
                    f = findings.setdefault((type(m).__name__, attr),
                                            Finding(type(m).__name__, attr))
                    f.kinds.add(kind)
                    f.points.add(f"{label}: {where}")
                    f.modules.add(path)
            return check

        handles = [b.register_forward_pre_hook(checker(f"before {names[id(b)].lstrip('.')}"))
                   for b in block_modules(watched)]
        handles += [m.register_forward_hook(checker(f"after {names[id(m)].lstrip('.')}"))
                    for m in attention]
        handles += [m.register_forward_hook(checker(f"site {n}")) for n, m in sites
                    if m not in attention]
        try:
            with torch.no_grad():
                make(torch.randint(3, vocab, (batch, seq), generator=gen))()
        finally:
            for h in handles:
                h.remove()
        after = diff(idle, snapshot(modules, fp))
        for (mid, attr) in after:
            f = findings.get((type(modules[mid][1]).__name__, attr))
            if f is not None:
                f.persists = True
    return findings


def nested_variants(entry, device, batch=1, seq=4, vocab=250) -> list:
    """(label, forward) of the light requests a forward may run nested in it, each as the
    worker runs it: TL forwards (with a mask, offset positions, attention weights returned,
    eager attention, each of TL's hook switches, a loss, from block 1 on a residual) and the
    plain HF forward module sites run in (with a mask, with attention-weight sites)."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, vocab, (batch, seq), generator=gen).to(device)
    mask = torch.ones_like(tokens)
    mask[0, :1] = 0
    positions = (torch.arange(seq, device=device) + 3).expand(batch, seq)

    def spec(**kw):
        return SimpleNamespace(**{**dict(output_attentions=False, start_at_layer=None,
                                         tl_flags=(), return_type="logits",
                                         loss_per_token=False), **kw})

    def run(s, **kw):
        return lambda: ModelWorker._forward(entry, s, tokens, **kw)()
    out = []
    bridge = entry.hosted.bridge if entry.tl_refused is None else None
    if bridge is not None:
        from hookwire.ir import TL_HOOK_FLAGS

        residual = torch.randn(batch, seq, bridge.cfg.d_model, generator=gen)
        out += [("tl", run(spec())), ("tl+mask", run(spec(), mask=mask)),
                ("tl+positions", run(spec(), positions=positions)),
                ("tl+output_attentions", run(spec(output_attentions=True))),
                ("tl+eager", run(spec(), eager=True)),
                ("tl+loss", run(spec(return_type="loss", loss_per_token=True))),
                ("tl+start_at_layer", run(spec(start_at_layer=1),
                                          residual=residual.to(device, entry.hosted.dtype)))]
        out += [(f"tl+{flag}", run(spec(tl_flags=(flag,)))) for flag in TL_HOOK_FLAGS]
    if entry.hf_model is not None:
        out += [("hf", run(spec(), on_modules=True)),
                ("hf+mask", run(spec(), on_modules=True, mask=mask)),
                ("hf+attention_weights", run(spec(), on_modules=True, attention_weights=True))]
    return out


def traces(entry, device="cpu") -> dict:
    """(class, attribute) -> Finding for every attribute a light request's forward changes
    for good (``nested_variants``, each from the model as the served forwards leave it):
    what a request run nested in another leaves behind for the interrupted one (an
    attribute that forward holds at a give-way point, reset by the nested one's teardown,
    is among ``audit``'s findings: one changed here is a change nothing restores)."""
    hosted = entry.hosted
    modules = reachable_modules({"bridge": hosted.bridge, "model": hosted.original,
                                 "plain": entry.hf_model})
    findings: dict = {}
    for label, _, _, _, make in forwards(entry, device):   # as a served forward leaves it
        with torch.no_grad():
            make(torch.randint(3, 250, (2, 5), generator=torch.Generator().manual_seed(2)))()
    for label, run in nested_variants(entry, device):
        fp = _Fingerprints()
        idle = snapshot(modules, fp)
        try:
            with torch.no_grad():
                run()
        except Exception as exc:  # the worker answers it with the error; its state counts
            label += f" (failed: {type(exc).__name__})"
        for (mid, attr), kind in diff(idle, snapshot(modules, fp)).items():
            path, m = modules[mid]
            f = findings.setdefault((type(m).__name__, attr), Finding(type(m).__name__, attr))
            f.kinds.add(kind)
            f.points.add(label)
            f.modules.add(path)
            f.persists = True
    return findings
