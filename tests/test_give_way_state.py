"""No forward holds live per-call state on the shared model where it gives way.

A long forward lets light requests of other users run nested in it (server/give_way.py): at
each block's pre-hook, after each attention give-way point and, in a TL forward, at its own
sites there. That is safe only if nothing of the interrupted forward's own, that it still
needs, is kept on the modules at those points (TL's ``start_at_layer`` arms every block with
the request's residual: such forwards never give way). For every served family, each forward
the worker lets give way (TL's, the plain HF forward module sites run in; each with and
without an attention mask) runs with a hook at every give-way point, which diffs the
``__dict__`` of every module reachable from the model against an idle snapshot
(tests/give_way_state.py). Every attribute found must be one judged harmless below, with the
reason; a new one fails here until it is judged (and, if live, the worker kept from giving
way where it is held). The other way round, every kind of light request a forward may run
nested in it (TL's forward with each of its options, the plain HF forward) may leave changed
for good only attributes judged harmless (``traces``).

A live leak found in a family's TL forward (RecurrentGemma's recurrence) keeps that family's TL
forwards from giving way (server/prepare.py ``TL_FORWARD_STATE``; the audit then looks at its
plain HF forward only), and a request-level test shows the interrupted request unchanged.
"""
from __future__ import annotations


import pytest
import torch

import hookwire.server as hs
from family_configs import tiny_config
from give_way_state import audit, traces
from graphs import graph
from nested_runs import held_beside
from hookwire.client import Connection
from hookwire.families import build_hf_model, family_for_architecture, served_architectures
from hookwire.server.models import host_model_object
from hookwire.server.prepare import prepare_model
from hookwire.validate import Limits

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                         "ignore::DeprecationWarning")]

# (module class, attribute) -> why it is harmless where a forward gives way.
_CAPTURED = ("set by a pre-hook on the block's ln1 (every forward), read only at the start of "
             "the attention and only on the split-qkv fork path (TL hook switches "
             "use_split_qkv_input / use_attn_in: such forwards never give way), cleared at the "
             "block's end; a nested forward sets its own before it reads it, and the "
             "interrupted one never reads it after a give-way point (the attention points "
             "come after the fork)")
_PATTERN = ("write-only: the attention's last pattern, kept for nothing in TL (no reader); "
            "a nested forward overwrites it, nobody reads either (it stays on the model "
            "after the forward: the last request's pattern is retained in memory)")
_RECURRENCE = ("RecurrentGemma's recurrence, kept on the modules: the plain HF forward (module "
               "sites, use_cache=False) resets it at each recurrent block's start, before it "
               "is read; its TL forward (with the cache) reads what the last forward left, so "
               "it never gives way (server/prepare.py TL_FORWARD_STATE; "
               "test_a_recurrent_gemma_forward_keeps_its_recurrence_while_another_runs_nested)")
HARMLESS = {
    **{(cls, "_captured_pre_ln_residual"): _CAPTURED for cls in (
        "PositionEmbeddingsAttentionBridge", "JointQKVAttentionBridge",
        "JointQKVPositionEmbeddingsAttentionBridge", "MPTALiBiAttentionBridge",
        "_BitNetAttentionBridge", "_Cohere2AttentionBridge", "_SmolLM3AttentionBridge")},
    **{(cls, "_pattern"): _PATTERN for cls in (
        "JointQKVAttentionBridge", "JointQKVPositionEmbeddingsAttentionBridge",
        "BloomAttentionBridge", "_OpenAIGPTJointQKVAttentionBridge")},
    ("RecurrentGemmaRglru", "recurrent_states"): _RECURRENCE,
    ("RecurrentGemmaRecurrentBlock", "conv1d_state"): _RECURRENCE,
}

# What a light request's forward, run nested, leaves changed on the model for good (class
# "*": any module class), and why the interrupted forward does not mind.
HARMLESS_TRACES = {
    **{("*", attr): (
        "a start_at_layer forward's teardown (in a finally: also when it fails) leaves the "
        "injection disarmed (None: as absent, TL's block reads getattr(..., None)); the "
        "interrupted forward never starts at a block itself "
        "(ModelWorker._forward_may_give_way)")
       for attr in ("_start_at_layer_idx", "_start_residual")},
    ("SSMBlockBridge", "_use_hook_mlp_in"): (
        "TL's set_use_hook_mlp_in writes a block-local fallback flag the SSM block lacked "
        "(flags_applied turns it back off, the interrupted forward's setting: forwards with "
        "hook switches on never give way)"),
    ("TransformerBridge", "_derived_position_ids_ok"): (
        "a cache of whether the HF model accepts position ids derived from a mask: a fact of "
        "the model, the same for every forward"),
    ("*", "_output_capturing_hooks_installed"): (
        "HF's capture_outputs installs its recording hooks once and marks the model; they "
        "record into a ContextVar that each decorated forward sets and resets (a nested "
        "forward's collector is its own; the interrupted forward never returns attention "
        "weights: such forwards never give way)"),
}


def judged(key, *tables) -> bool:
    return any(key in t or ("*", key[1]) in t for t in tables)


SERVED = sorted(served_architectures())


def hosted_entry(arch: str):
    """The family's tiny model (tests/family_configs.py), hosted and prepared as the server
    does (``host_model_object``, ``prepare_model``), without a server."""
    family = family_for_architecture(arch)
    model, _ = build_hf_model(arch, tiny_config(arch, family.config_class), seed=0,
                              dtype=torch.float32)
    return prepare_model(host_model_object(f"tiny-{arch}", model))


@pytest.mark.parametrize("arch", SERVED)
def test_no_per_forward_state_is_held_where_a_forward_gives_way(arch):
    """Every attribute of every module that differs from the idle model at a give-way point
    of one of the family's forwards is judged harmless in ``HARMLESS``."""
    findings = audit(hosted_entry(arch))
    unjudged = [f.describe() for key, f in sorted(findings.items())
                if not judged(key, HARMLESS)]
    assert not unjudged, f"{arch}: per-forward state held where a forward gives way " \
        f"(a nested request reads or clobbers it):\n  " + "\n  ".join(unjudged)


@pytest.mark.parametrize("arch", SERVED)
def test_a_nested_request_leaves_nothing_the_interrupted_forward_reads(arch):
    """Every light request a forward may run nested in it (TL's forward with a mask, offset
    positions, attention weights, eager attention, each hook switch, a loss, from a block on
    a residual; the plain HF forward with a mask, with attention-weight sites), run on the
    model as served forwards leave it, changes for good only attributes judged harmless
    (``HARMLESS``: what a forward holds and a nested one overwrites; ``HARMLESS_TRACES``)."""
    findings = traces(hosted_entry(arch))
    unjudged = [f"{f.describe()} by {sorted(f.points)}" for key, f in sorted(findings.items())
                if not judged(key, HARMLESS, HARMLESS_TRACES)]
    assert not unjudged, f"{arch}: a nested request's forward leaves on the model:\n  " + \
        "\n  ".join(unjudged)


def test_the_audit_sees_state_a_forward_holds():
    """The audit itself: TL's start_at_layer arms every block with the request's residual
    (``_start_at_layer_idx``, ``_start_residual``; the reason such forwards never give way):
    run as the outer forward, it is found on every block."""
    findings = audit(hosted_entry("GPT2LMHeadModel"), start_at_layer=1)
    found = {attr for (_, attr) in findings}
    assert {"_start_at_layer_idx", "_start_residual"} <= found, sorted(found)


# ---- the live leak, through the server -------------------------------------------------------

RG = "RecurrentGemmaForCausalLM"


def test_a_recurrent_gemma_forward_keeps_its_recurrence_while_another_runs_nested():
    """User A's 2 x 1 forward on RecurrentGemma is held at its first block (a recurrent
    layer) until user B's light 2 x 1 request queues, then gives way to it there. A's
    logits must equal A's solo run (they do not: B's forward left its convolution state on
    the layer, and A's one-token convolution reads it)."""
    name = "tiny-rg"
    family = family_for_architecture(RG)
    model, _ = build_hf_model(RG, tiny_config(RG, family.config_class), seed=0,
                              dtype=torch.float32)
    srv = hs.start(models={name: model}, port=0, limits=Limits(max_request_seconds=120))
    try:
        bridge = srv.server.entries[name].hosted.bridge
        gen = torch.Generator().manual_seed(19)
        tokens_a = torch.randint(3, 250, (2, 1), generator=gen)
        tokens_b = torch.randint(3, 250, (2, 1), generator=gen)
        with torch.no_grad():
            solo_a, solo_b = bridge(tokens_a), bridge(tokens_b)
        g = graph(name)
        conn = Connection(srv.url)  # the control: A's request alone equals its solo run
        try:
            alone = conn.run(g, {"input_ids": tokens_a}).values["__logits__"]
        finally:
            conn.close()
        torch.testing.assert_close(alone, solo_a, rtol=0, atol=0)
        results = held_beside(srv, bridge.blocks[0], g, {"input_ids": tokens_a},
                              g, {"input_ids": tokens_b})
    finally:
        srv.stop()
    torch.testing.assert_close(results["b"].values["__logits__"], solo_b, rtol=0, atol=0)
    torch.testing.assert_close(results["a"].values["__logits__"], solo_a, rtol=0, atol=0)
