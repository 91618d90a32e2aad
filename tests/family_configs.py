"""Tiny random configs of every family hookwire serves (2 layers, width 64, vocabulary 300),
for the family matrix (``tests/test_families.py``) and ``scripts/gpu_check.sh``.

Built from the config class's own arguments: the common sizes under each class's spelling
(``attribute_map``: GPT-2's ``n_embd`` is ``hidden_size``), the optional ones a class takes
(kv heads, head dim, expert counts), token ids inside the vocabulary, and for the families
whose defaults do not fit two small layers (hybrid attention/SSM layer patterns, latent
attention ranks, rotary dims), the few values below.
"""
from __future__ import annotations

import inspect

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=300, max_position_embeddings=128)
OPTIONAL = dict(num_key_value_heads=2, head_dim=16, n_inner=128, ffn_dim=128,
                word_embed_proj_dim=64, num_experts=4, num_local_experts=4,
                moe_intermediate_size=32, num_experts_per_tok=2,
                shared_expert_intermediate_size=32, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
_MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=16, num_key_value_heads=4)
_MOE_GROUPS = dict(n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1)
_MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16,
               mamba_chunk_size=16)
_LINEAR_ATTN = dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
                    linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)

SPECIAL = {
    "BertLMHeadModel": dict(is_decoder=True),   # causal: BERT as a decoder
    "GPTNeoForCausalLM": dict(attention_types=[[["global", "local"], 1]], window_size=4),
    "GPTJForCausalLM": dict(rotary_dim=8),
    "CodeGenForCausalLM": dict(rotary_dim=8),
    "Mamba2ForCausalLM": dict(num_heads=4, head_dim=32, expand=2, n_groups=1, state_size=16,
                              chunk_size=16),
    "BambaForCausalLM": dict(attn_layer_indices=[1], **_MAMBA2),
    "GraniteMoeHybridForCausalLM": dict(layer_types=["mamba", "attention"], **_MAMBA2),
    "FalconH1ForCausalLM": dict(mamba_d_ssm=128, **_MAMBA2),
    "JambaForCausalLM": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                             expert_layer_offset=1, use_mamba_kernels=False, mamba_d_state=8,
                             mamba_dt_rank=8),
    "Qwen3NextForCausalLM": _LINEAR_ATTN,
    "Qwen3_5ForCausalLM": _LINEAR_ATTN,
    "Qwen3_5MoeForCausalLM": _LINEAR_ATTN,
    "RecurrentGemmaForCausalLM": dict(block_types=["recurrent", "attention"],
                                      attention_window_size=16, lru_width=64),
    "Zamba2ForCausalLM": dict(layers_block_type=["mamba", "hybrid"], n_mamba_heads=4,
                              mamba_d_state=16, mamba_ngroups=1, chunk_size=16,
                              num_mem_blocks=1, hybrid_layer_ids=[1]),
    "DeepseekV2ForCausalLM": dict(first_k_dense_replace=1, **_MLA, **_MOE_GROUPS),
    "DeepseekV3ForCausalLM": dict(first_k_dense_replace=1, **_MLA, **_MOE_GROUPS),
    "YoutuForCausalLM": _MLA,
    "GlmMoeDsaForCausalLM": dict(index_head_dim=16, index_n_heads=2, **_MLA, **_MOE_GROUPS),
    "Lfm2ForCausalLM": dict(layer_types=["conv", "full_attention"]),
    "Lfm2MoeForCausalLM": dict(num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "NemotronHForCausalLM": dict(layers_block_type=["mamba", "attention"], mamba_num_heads=4,
                                 mamba_head_dim=32, ssm_state_size=16, chunk_size=16,
                                 n_groups=1),
    "Ernie4_5_MoeForCausalLM": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32),
    "Glm4MoeForCausalLM": dict(n_routed_experts=4, n_shared_experts=1),
    "Glm4MoeLiteForCausalLM": dict(n_routed_experts=4, n_shared_experts=1, **_MLA),
    "DeepseekV4ForCausalLM": dict(n_routed_experts=4, n_shared_experts=1, q_lora_rank=16,
                                  o_lora_rank=16, qk_rope_head_dim=8, index_n_heads=2,
                                  index_head_dim=16, index_topk=4),
    "HrmTextForCausalLM": dict(H_cycles=1, L_cycles=2, L_bp_cycles=[1]),
    "Gemma4ForCausalLM": dict(layer_types=["sliding_attention", "full_attention"],
                              sliding_window=8, vocab_size_per_layer_input=300,
                              hidden_size_per_layer_input=16, global_head_dim=16),
}


def tiny_config(architecture: str, config_class: type) -> dict:
    """Keyword arguments for ``config_class`` that make a 2-layer, 64-wide model."""
    names = getattr(config_class, "attribute_map", {}) or {}
    try:
        params = inspect.signature(config_class.__init__).parameters
    except (TypeError, ValueError):
        params = {}
    config = {names.get(k, k): v for k, v in SIZES.items()}
    config.update({k: v for k, v in OPTIONAL.items() if k in params})
    config.update(SPECIAL.get(architecture, {}))
    return config
