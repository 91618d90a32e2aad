"""Which rows of the one batched forward hold what, and which swaps happen where.

One remote pyvene call is ONE forward over a batch made of row blocks: the base rows, one
block per source that some intervention reads (parallel mode shares a block between groups
given the same source object; serial mode gives every group its own, since a group's rows
are intervened on by the group before it), and, for ``output_original_output=True``, a copy of
the base rows that no intervention touches. Blocks shorter than the longest are padded on
the right: in a causal LM a position never sees later ones, so the real positions compute
exactly what they compute alone; and a source block is cut to the positions its
interventions read (:func:`read_length`), so that a longer source does not pad the base. The
rows whose logits come back (base, and its untouched
copy) come first, so that after the last block touching a source row the batch can be
narrowed to them (``RemoteIntervenableModel._narrowing``).

A :class:`Task` is one setter in pyvene's sense: at its component's site, gather the source
activation from ``src`` rows (pyvene's getter) -- or take a constant -- and write the
intervened activation into ``dst`` rows (pyvene's setter). Which tasks exist mirrors
``IntervenableModel._wait_for_forward_with_{parallel,serial}_intervention``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyvene as pv
import torch
import torch.nn.functional as F

from hookwire.errors import TraceError
from hookwire.pyvene.components import ComponentSite


class UnsupportedCall(TraceError):
    """A call that local pyvene 0.1.8 fails on, or silently ignores, where the remote plan
    would return a value: refused before anything is sent, naming the intervention and what
    to write instead (a remote run gives local pyvene's answer or a hookwire error)."""
    code = "unsupported_call"


@dataclass(frozen=True)
class Rows:
    start: int
    stop: int
    length: int

    def of(self, x, seq_len: int):
        """This block's rows of a site value (B, S, ...), cut to the block's own length."""
        rows = x[self.start:self.stop]
        return rows if self.length == seq_len else rows[:, :self.length]


@dataclass
class Layout:
    """The row blocks of one batched forward (base, one per source, an untouched copy of the
    base), and the padded ``input_ids`` / ``attention_mask`` they make together."""
    blocks: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)
    rows: list[Rows] = field(default_factory=list)

    def add(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            keep: int | None = None) -> Rows:
        """A block of rows; ``keep``: only its first ``keep`` positions are needed (see
        :func:`read_length`), so it is cut there -- unless it is padded: a fully masked
        (padding) query attends to every position of its row, later ones included, so
        there the row's length matters."""
        if keep is not None and 0 < keep < input_ids.shape[1] and attention_mask is None:
            input_ids = input_ids[:, :keep]
        start = self.rows[-1].stop if self.rows else 0
        r = Rows(start, start + input_ids.shape[0], input_ids.shape[1])
        self.blocks.append(input_ids)
        self.masks.append(attention_mask)
        self.rows.append(r)
        return r

    @property
    def seq_len(self) -> int:
        return max(r.length for r in self.rows)

    def input_ids(self, pad_id: int = 0) -> torch.Tensor:
        s = self.seq_len
        return torch.cat([F.pad(ids, (0, s - ids.shape[1]), value=pad_id)
                          for ids in self.blocks], dim=0)

    def attention_mask(self) -> torch.Tensor | None:
        """None unless some block came with padding of its own (the user's 0/1 mask); our
        right padding is masked out too then."""
        if all(m is None for m in self.masks):
            return None
        s = self.seq_len
        return torch.cat([F.pad(torch.ones_like(ids) if m is None else m.to(torch.int64),
                                (0, s - ids.shape[1]), value=0)
                          for ids, m in zip(self.blocks, self.masks)], dim=0)


@dataclass
class Task:
    """One intervention at one site: where pyvene's getter reads (``src`` rows and unit
    locations, or a constant source), which intervention runs, and where its setter writes
    (``dst`` rows and locations), in pyvene's setter order."""
    key: str
    order: int                      # pyvene's setter order: group, then key within it
    site: ComponentSite
    unit: str                       # pyvene unit: "pos", "h", "h.pos", ...
    intervention: object
    dst: Rows
    dst_locs: object                # pyvene unit locations for the setter (None: all)
    subspaces: object
    src: Rows | None = None         # rows the getter reads (None: no getter)
    src_locs: object = None
    source_constant: object = None  # source_representations[key]


def read_length(unit: str, locs) -> int | None:
    """How many leading positions of a row block the unit locations ``locs`` touch (the
    largest position + 1), or None when that is not known: every position (``None``),
    heads only, negative positions (counted from a row's end), other units or forms.

    A source block is cut to what its interventions read. In a causal LM a position never
    sees later ones, so the positions read are unchanged; and a source longer than the base
    then no longer pads the base rows to its length -- padding changes the shapes of the
    attention computation, which moves the base's logits by float rounding (~5e-6 on a
    4096-wide Llama) away from pyvene's own base-only forward."""
    if locs is None:
        return None
    if unit == "pos":
        positions = locs
    elif unit == "h.pos" and isinstance(locs, (list, tuple)) and len(locs) == 2:
        positions = locs[1]
    else:
        return None
    leaves: list = []

    def walk(value):
        if isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        else:
            leaves.append(value)
    walk(positions)
    if not leaves or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                             for v in leaves):
        return None
    return max(leaves) + 1


def _union(lengths) -> int | None:
    lengths = list(lengths)
    return None if not lengths or any(n is None for n in lengths) else max(lengths)


def _needs_getter(intervention) -> bool:
    return not getattr(intervention, "is_source_constant", False)


def _no_cut(site) -> bool:
    return False


def parallel_tasks(pvm, layout: Layout, sites: dict, sources: list, unit_locations: dict,
                   source_reps, subspaces, can_cut=_no_cut) -> list[Task]:
    """``can_cut(site)``: whether a row block read (or written) at ``site`` may be cut to the
    positions used there -- only where the site's value is (batch, seq, ...) with no other
    sequence dim (attention weights have two)."""
    ul_src, ul_dst = unit_locations["sources->base"]
    base = layout.rows[0]
    if source_reps is None:
        given = [key for g, keys in pvm._intervention_group.items() if sources[g] is not None
                 for key in keys]
        if given and ul_src is None:
            # {"base": ...} or (None, pos): pyvene indexes the missing source locations for
            # every key of a group given a source, and fails (TypeError).
            raise UnsupportedCall(
                f"intervention {given[0]!r} is given a source, but unit_locations name no "
                "source positions ({'base': ...} or (None, pos)): local pyvene fails on this "
                "call. Give both, {'sources->base': (source_pos, base_pos)}, or pass no "
                "sources (a constant source goes in source_representations=)", key=given[0])
    blocks: dict[int, Rows] = {}
    reads: list[tuple[Task, object]] = []   # (task, its source): rows assigned below
    tasks = []
    for g, keys in pvm._intervention_group.items():
        source = sources[g]
        for key in keys:
            iv = pvm.interventions[key]
            i = pvm.sorted_keys.index(key)
            const = source_reps.get(key) if source_reps is not None else None
            has_source = const is not None if source_reps is not None else source is not None
            if not (has_source or iv.is_source_constant):
                continue  # pyvene registers no setter for it
            if isinstance(iv, pv.CollectIntervention) and has_source:
                _refuse_collect_with_source(key)
            task = Task(key, len(tasks), sites[key], pvm.representations[key].unit, iv,
                        base,
                        ul_dst[i] if ul_dst is not None else None,
                        subspaces[i] if subspaces is not None else None,
                        source_constant=const)
            if source_reps is None and _needs_getter(iv):
                task.src_locs = ul_src[i] if ul_src is not None else None
                reads.append((task, source))
            tasks.append(task)
    need: dict[int, list] = {}
    for task, source in reads:
        need.setdefault(id(source), []).append(
            read_length(task.unit, task.src_locs) if can_cut(task.site) else None)
    for task, source in reads:
        if id(source) not in blocks:
            blocks[id(source)] = layout.add(*source, keep=_union(need[id(source)]))
        task.src = blocks[id(source)]
    return tasks


def serial_tasks(pvm, layout: Layout, sites: dict, sources: list, unit_locations: dict,
                 source_reps, subspaces, can_cut=_no_cut) -> list[Task]:
    groups = list(pvm._intervention_group.items())
    base = layout.rows[0]
    if source_reps is not None:
        # pyvene 0.1.8's serial loop skips every group whose source is None -- all of them
        # when only source_representations are given -- and returns the base's own output:
        # it silently applies nothing. Applying them here would answer differently.
        raise UnsupportedCall(
            f"source_representations in serial mode (interventions {list(pvm.sorted_keys)}): "
            "local pyvene applies none of them (its serial loop skips every group without a "
            "source) and returns the base's own output. Use mode='parallel', where "
            "source_representations are applied to the base, or pass sources", mode="serial")
    collecting = [k for k in pvm.sorted_keys
                  if isinstance(pvm.interventions[k], pv.CollectIntervention)]
    if collecting:
        # pyvene's serial loop gives a Collect either a getter (its group has a source: the
        # collecting setter then appends to the source tensor, AttributeError) or nothing
        # (no source: the group is skipped, and reading what it collected raises KeyError).
        raise UnsupportedCall(
            f"CollectIntervention {collecting[0]!r} in serial mode: local pyvene fails on this "
            "call. Collect with mode='parallel' (its group given no source)",
            key=collecting[0])
    order = [g for g, _ in groups if sources[g] is not None]
    # Group g reads source g's rows and writes into source g+1's (the last one: the base's);
    # each source block is cut to the positions read or written there (read_length).
    planned = []
    need: dict[int, list] = {g: [] for g in order}
    for n, g in enumerate(order):
        keys = pvm._intervention_group[g]
        dst = order[n + 1] if n + 1 < len(order) else None
        reading = [key for key in keys
                   if _serial_locs(unit_locations, g, len(groups), keys, key)[0] is not None]
        if len(reading) > 1:
            # pyvene keeps only the last getter handle of a group and removes that one: the
            # others fire in every later forward, and it raises ("each getter and setter
            # should be called only once").
            raise UnsupportedCall(
                f"serial mode with several interventions in one group ({reading}): local "
                "pyvene fails on this call. Give each representation its own group (drop "
                "group_key), or use mode='parallel'", key=reading[0])
        for key in keys:
            src_locs, dst_locs = _serial_locs(unit_locations, g, len(groups), keys, key)
            if src_locs is None:
                continue
            unit = pvm.representations[key].unit
            cut = can_cut(sites[key])
            if _needs_getter(pvm.interventions[key]):
                need[g].append(read_length(unit, src_locs) if cut else None)
            if dst is not None:
                need[dst].append(read_length(unit, dst_locs) if cut else None)
            planned.append((g, dst, key, src_locs, dst_locs))
    rows = {g: layout.add(*sources[g], keep=_union(need[g])) for g in order}
    tasks = []
    for g, dst, key, src_locs, dst_locs in planned:
        iv = pvm.interventions[key]
        i = pvm.sorted_keys.index(key)
        task = Task(key, len(tasks), sites[key], pvm.representations[key].unit, iv,
                    rows[dst] if dst is not None else base, dst_locs,
                    subspaces[i] if subspaces is not None else None)
        if _needs_getter(iv):
            task.src, task.src_locs = rows[g], src_locs
        tasks.append(task)
    return tasks


def _refuse_collect_with_source(key):
    # pyvene's getter stores the source activation under the key, and the collecting
    # setter then appends to that tensor (AttributeError).
    raise UnsupportedCall(
        f"CollectIntervention {key!r} is in a group given a source: local pyvene fails on "
        "this call. Collect reads the base run: pass None as that group's source "
        "(sources=[..., None]) or leave out sources", key=key)


def _serial_locs(unit_locations, g, n_groups, keys, key):
    name = f"source_{g}->source_{g + 1}" if g != n_groups - 1 else f"source_{g}->base"
    pair = unit_locations[name]
    k = keys.index(key)
    return (pair[0][k] if pair[0] is not None else None,
            pair[1][k] if pair[1] is not None else None)


__all__ = ["Rows", "Layout", "Task", "UnsupportedCall", "parallel_tasks", "serial_tasks",
           "read_length"]
