"""Several requests' graphs in one forward pass.

Each request owns a contiguous block of rows of the batch and, when requests of different
lengths are right-padded together, its first ``seq`` positions (causal attention: padding
after a request's last token cannot change anything at or before it, so its positions equal
its solo run). At every site each request's interleaver sees a *view* of its own rows and
positions, so ``act[:, -1]`` is its own last token, an in-place edit lands in its own rows,
and a replacement is copied back into its own block only.

A request whose op fails mid-forward is dropped from the rest of the pass (its error goes to
its own callback); its batch mates go on. The forward stops early once no request needs a
later site or the output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from hookwire.executor import Interleaver, _StopForward
from hookwire.module_sites import attach


@dataclass
class BatchMember:
    interleaver: Interleaver
    rows: slice
    seq: int
    need_output: bool
    on_error: Callable[[BaseException], None]
    error: BaseException | None = None
    _index: dict = field(default_factory=dict)

    def __post_init__(self):
        self._index = {(info.name, info.call): i
                       for i, info in enumerate(self.interleaver.vg.site_infos)}

    @property
    def active(self) -> bool:
        return self.error is None

    @property
    def wants_more(self) -> bool:
        return self.active and (self.need_output or not self.interleaver.finished_sites)

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.on_error(exc)

    def own_part(self, info, full_seq: int):
        """Index of this member's rows (dims named B) and positions (dims named S)."""
        if self.seq == full_seq:
            positions = slice(None)
        else:
            positions = slice(0, self.seq)
        return tuple(self.rows if d == "B" else positions if d == "S" else slice(None)
                     for d in info.shape)


def run_batch(members: list[BatchMember], site_modules: dict, forward: Callable[[], object],
              full_seq: int):
    """One forward for all members; returns its output (None if stopped early)."""
    names = dict.fromkeys(info.name for m in members for info in m.interleaver.vg.site_infos)
    for m in members:
        try:
            m.interleaver.start()
        except Exception as exc:
            m.fail(exc)
    handles = []
    try:
        for name in names:
            handles.append(attach(site_modules[name], name,
                                  _batch_hook(name, members, full_seq)))
        try:
            return forward()
        except _StopForward:
            return None
    finally:
        for h in handles:
            h.remove()


def _batch_hook(name: str, members: list[BatchMember], full_seq: int):
    counter = [0]

    def hook(module, args, output):
        call = counter[0]
        counter[0] += 1
        replacements = []
        for m in members:
            index = m._index.get((name, call)) if m.active else None
            if index is None:
                continue
            info = m.interleaver.vg.site_infos[index]
            part = m.own_part(info, full_seq)
            try:
                result = m.interleaver.at_site(index, output[part])
            except Exception as exc:
                m.fail(exc)
                continue
            if result is not None:
                replacements.append((part, result))
        new = None
        if replacements:
            # Applied after every member's in-place edits, so none is lost in the copy.
            new = output.clone()
            for part, value in replacements:
                new[part] = value
        if not any(m.wants_more for m in members):
            raise _StopForward
        return new
    return hook


__all__ = ["BatchMember", "run_batch"]
