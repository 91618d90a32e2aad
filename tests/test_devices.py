"""Values a request brings go where the activation they meet lives, and users' resident
values do not pile up in accelerator memory.

There is no GPU here; the second device is ``meta`` (a real torch device whose tensors have
no data), which exercises exactly the placement rules a second GPU would.
"""
from __future__ import annotations

import torch

from hookwire.executor import Interleaver
from hookwire.graph import Graph
from hookwire.server.residents import Residents
from hookwire.validate import Limits, SiteInfo, infer_shapes, validate_structure

SITES = [SiteInfo("layer.0", 0, ("B", "S", 4), torch.float32),
         SiteInfo("layer.9", 0, ("B", "S", 4), torch.float32)]
TABLE = ({(s.name, 0): s for s in SITES}, {(s.name, 0): i for i, s in enumerate(SITES)})


def run_on_two_devices(nodes, saves=None, constants=None):
    """The interleaver at two sites, the first on the CPU, the second on ``meta``."""
    graph = Graph.model_validate({
        "model": "m", "inputs": {"input_ids": "input_ids"}, "constants": list(constants or {}),
        "sites": [{"name": s.name} for s in SITES], "nodes": nodes, "saves": saves or {},
        "forward": {"return_type": None}})
    vg = validate_structure(graph, *TABLE, Limits())
    infer_shapes(vg, 2, 3, constants or {}, Limits())
    saved = {}
    il = Interleaver(vg, dict(constants or {}),
                     lambda name, value, snapshot=True: saved.__setitem__(name, value))
    il.start()
    first = il.at_site(0, torch.ones(2, 3, 4))
    second = il.at_site(1, torch.empty(2, 3, 4, device="meta"))
    return first, second, saved


def test_constants_and_earlier_values_go_to_the_activation_they_meet():
    nodes = [{"id": 0, "op": "site.read", "args": [0]},                       # on the CPU
             {"id": 1, "op": "site.read", "args": [1]},                       # on meta
             {"id": 2, "op": "add", "args": [{"ref": 1}, {"const": "c"}]},    # CPU constant
             {"id": 3, "op": "add", "args": [{"ref": 2}, {"ref": 0}]},        # earlier site
             {"id": 4, "op": "site.write", "args": [1, {"ref": 3}],
              "kwargs": {"mode": "replace"}}]
    _, replacement, _ = run_on_two_devices(nodes, constants={"c": torch.ones(4)})
    assert replacement.device.type == "meta" and replacement.shape == (2, 3, 4)


def test_a_replacement_made_elsewhere_is_moved_to_the_site():
    """A constant written into a site on another device arrives on that device."""
    nodes = [{"id": 0, "op": "site.write", "args": [1, {"const": "patch"}],
              "kwargs": {"mode": "replace"}}]
    _, replacement, _ = run_on_two_devices(nodes, constants={"patch": torch.zeros(2, 3, 4)})
    assert replacement.device.type == "meta"


def test_seeded_noise_is_drawn_then_placed_with_the_activation():
    nodes = [{"id": 0, "op": "site.read", "args": [1]},
             {"id": 1, "op": "randn_like", "args": [{"ref": 0}], "kwargs": {"seed": 3}},
             {"id": 2, "op": "add", "args": [{"ref": 0}, {"ref": 1}]},
             {"id": 3, "op": "site.write", "args": [1, {"ref": 2}],
              "kwargs": {"mode": "replace"}}]
    _, replacement, _ = run_on_two_devices(nodes)
    assert replacement.device.type == "meta"


def test_resident_values_on_an_accelerator_are_capped_server_wide():
    """Past the server-wide cap, values a user keeps go to CPU memory (the copy the server
    made to send them anyway); dropping them gives the room back."""
    residents = Residents(max_bytes_per_user=1 << 20, ttl_s=60, max_device_bytes=100)
    alice, bob = residents.for_user("alice"), residents.for_user("bob")
    on_device = torch.empty(16, device="meta")              # 64 bytes "on the accelerator"
    assert alice.put("v" + "a" * 24, on_device, cpu_copy=torch.zeros(16))
    assert alice.get("v" + "a" * 24).device.type == "meta"
    assert residents.device_budget.bytes == 64
    assert bob.put("v" + "b" * 24, torch.empty(16, device="meta"), cpu_copy=torch.ones(16))
    kept = bob.get("v" + "b" * 24)
    assert kept.device.type == "cpu" and torch.equal(kept, torch.ones(16))  # over the cap
    assert residents.device_budget.bytes == 64
    residents.drop_user("alice")
    assert residents.device_budget.bytes == 0
    assert bob.put("v" + "c" * 24, torch.empty(16, device="meta"), cpu_copy=torch.ones(16))
    assert bob.get("v" + "c" * 24).device.type == "meta"
