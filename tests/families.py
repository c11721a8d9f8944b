"""Tiny random models of many decoder families, built in code from transformers' config classes
(hidden 64, 2 layers), for the family matrix (tests/test_families.py, benchmarks/families.py)."""

from pathlib import Path

import torch

# per family: what its config needs beyond the common fields (its own names, or defaults that do not
# fit a 64-wide model: Gemma's head_dim 256, OPT's ffn 3072 and 768-wide embedding projection)
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},  # q/k/v biases
    "qwen3": dict(head_dim=16),
    "gemma2": dict(head_dim=16),  # soft-capped attention and logits
    "gemma3_text": dict(head_dim=16, tie_word_embeddings=True, final_logit_softcapping=30.0),
    "phi3": {},  # fused qkv_proj, gate_up_proj
    "phi": {},  # dense, fc1, fc2, biases
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "gpt2": dict(n_inner=128),  # Conv1D c_attn, c_proj, c_fc
    "gpt_neox": {},  # fused query_key_value
    "falcon": dict(ffn_hidden_size=128, head_dim=None),
    "olmo2": {},
    "stablelm": {},
}
NO_HEAD_DIM = {"falcon"}  # FalconConfig computes head_dim itself
# MoE families whose experts are stacked 3-D parameters: discovery refuses them; scored with these targets
MOE = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2)}
MOE_TARGETS = {"mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def tiny_family(model_type: str, folder, tokenizer, seed: int = 0) -> str:
    """Writes a tiny random `model_type` with `tokenizer` to `folder`; returns the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.eos_token_id)
    kw = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **ids)
    kw.update({k: v for k, v in {**FAMILIES, **MOE}[model_type].items() if v is not None})
    if model_type in NO_HEAD_DIM:
        kw.pop("head_dim", None)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-zero biases and norm offsets, so a dropped or doubled one shows up
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
