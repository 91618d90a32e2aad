"""pyvene components -> HF module sites, read from pyvene's own tables.

pyvene maps an abstract component (``block_output``, ``mlp_activation``, ``head_query_output``
...) to a module path pattern and a hook kind per HF model class
(``pyvene.models.intervenable_modelcard.type_to_module_mapping``). We look that table up for
the model class of the family the server reports, so every family pyvene knows works without
a table of ours. A component that is not in the table is, as in pyvene, a direct module
reference ``<path>.input`` / ``<path>.output``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pyvene.models.constants import CONST_INPUT_HOOK, CONST_OUTPUT_HOOK
from pyvene.models.intervenable_modelcard import type_to_module_mapping

from hookwire.errors import HookwireError, SiteNotServed
from hookwire.module_sites import module_site

_HOOK_KINDS = {CONST_INPUT_HOOK: "input", CONST_OUTPUT_HOOK: "output"}
_INDEX = re.compile(r"\[(\d+)\]")


class UnknownComponent(HookwireError):
    """A representation names a component this model family does not have (or that does not
    run in the server's forward)."""
    code = "unknown_component"


@dataclass(frozen=True)
class ComponentSite:
    component: str
    path: str     # dotted HF module path: transformer.h.1.mlp
    kind: str     # "output" | "input"

    @property
    def site(self) -> str:
        return module_site(self.path, self.kind)

    @property
    def input_site(self) -> str:
        """The module's input: what pyvene's SkipIntervention reads from the source run."""
        return module_site(self.path, "input")


def _dotted(pattern: str) -> str:
    return _INDEX.sub(r".\1", pattern)


def component_site(model_class: type, representation) -> ComponentSite:
    component = representation.component
    table = type_to_module_mapping.get(model_class, {})
    if component in table:
        pattern, hook_type = table[component][0], table[component][1]
        if "%s" in pattern:
            try:
                if representation.moe_key is None:
                    pattern = pattern % (representation.layer,)
                else:
                    pattern = pattern % (int(representation.layer), int(representation.moe_key))
            except TypeError:
                raise UnknownComponent(f"component {component!r} needs a layer index") from None
        return ComponentSite(component, _dotted(pattern), _HOOK_KINDS[hook_type])
    head, _, kind = component.rpartition(".")
    if head and kind in ("input", "output"):
        return ComponentSite(component, _dotted(head), kind)
    known = ", ".join(sorted(table)) or "(pyvene has no table for this model class)"
    raise UnknownComponent(
        f"unknown pyvene component {component!r} for {model_class.__name__}: use one of "
        f"{known}, or a module path ending in '.input' / '.output'", component=component)


def check_fires(cs: ComponentSite, info, model_name: str) -> None:
    """The server lists only module sites that fire with a tensor: refuse others by name,
    and sites it cannot serve with the reason it gives."""
    reason = info.unserved_reason(cs.site)
    if reason is not None:
        raise SiteNotServed(f"component {cs.component!r} maps to module {cs.path!r} "
                            f"({cs.kind}), which cannot be intervened on remotely: {reason}",
                            component=cs.component)
    if (cs.site, 0) not in info.site_index:
        raise UnknownComponent(
            f"component {cs.component!r} maps to module {cs.path!r} ({cs.kind}), which does not "
            f"run with a tensor {cs.kind} in {model_name!r}'s forward on the server (wrong layer "
            "or path, or a module the model skips, e.g. attention dropout under SDPA)",
            component=cs.component)


__all__ = ["ComponentSite", "UnknownComponent", "component_site", "check_fires"]
