"""A ~20B-total DeepSeek-style MoE (fine-grained routed experts + shared experts), for a 64-chip
v5p-like slice: experiments/moe_1b.py (same layout, precision, batch and mesh) made wider and deeper;
`python -m moejax.tools.memory` reports its bytes per device (docs/memory.md)."""
from experiments import moe_1b


def get_config():
  c = moe_1b.get_config()
  m = c.model
  m.d_model, m.num_layers, m.dense_ffn_dim = 2048, 28, 10944
  m.attn.head_dim, m.expert_ffn_dim = 128, 1792
  return c
