"""QK-clip (MuonClip, Kimi K2 technical report, arXiv 2507.20534, sec. 2.1): after each optimizer
step, every attention head h whose largest logit S_h in that step exceeded the threshold tau has its
query and key projections rescaled so the logit scales by gamma_h = min(1, tau / S_h):

  MHA:  W_q^h *= sqrt(gamma_h),  W_k^h *= sqrt(gamma_h).
  MLA:  the per-head no-RoPE query and key parts by sqrt(gamma_h), the RoPE query part by gamma_h;
        the RoPE key is shared by all heads and is left alone.
  GQA:  a kv head is shared by its group, so it takes sqrt(min gamma of the group) and each query
        head the rest, gamma_h / sqrt(min gamma): every head's logits scale by exactly gamma_h.

Heads that stayed under tau are untouched. Applies to GQA, MHA, SWA and MLA layers; KDA has no
softmax logits (its logit max is NaN, and NaN never clips), and NSA's compressed keys pass through an
MLP, so rescaling its key projections would not rescale its logits (validation refuses NSA). `config.optim.qk_clip` = tau; 0 turns it off. Axis letters: L layers, H query
heads, G kv heads.
"""
import jax.numpy as jnp

from moejax.attention import layer_attentions, repeating_unit


def clip_factors(logit_max_H, tau: float):
  """gamma_h = min(1, tau / S_h); 1 where S_h is NaN or not above tau."""
  return jnp.where(logit_max_H > tau, tau / jnp.where(logit_max_H > tau, logit_max_H, 1.0), 1.0)


def _scale_heads(w, factor_LH, head_axis: int):
  """w [L, ..., heads at head_axis (counted without L), ...] times factor [L, heads]."""
  shape = [factor_LH.shape[0]] + [1] * (w.ndim - 1)
  shape[head_axis + 1] = factor_LH.shape[1]
  return w * factor_LH.reshape(shape).astype(w.dtype)


def clip_attention(p: dict, attention: str, gamma_LH, cfg) -> dict:
  """One attention's (stacked over L layers) params with QK-clip applied by factors gamma_LH."""
  p = dict(p)
  if attention == 'mla':
    Nn = cfg.qk_nope_head_dim
    half = jnp.sqrt(gamma_LH)
    q_key = 'wq_b' if 'wq_b' in p else 'wq'
    q = p[q_key]                                           # [L, in, H, Nn + R]
    p[q_key] = jnp.concatenate([_scale_heads(q[..., :Nn], half, 1),
                                _scale_heads(q[..., Nn:], gamma_LH, 1)], axis=-1)
    kv = p['wkv_b']                                        # [L, C, H, Nn + M]
    p['wkv_b'] = jnp.concatenate([_scale_heads(kv[..., :Nn], half, 1), kv[..., Nn:]], axis=-1)
    return p
  if attention not in ('gqa', 'mha', 'swa'):
    return p
  L, H = gamma_LH.shape
  G = p['wk'].shape[2]                                     # wk [L, D, G, N]
  gamma_LGh = gamma_LH.reshape(L, G, H // G)
  k_factor_LG = jnp.sqrt(gamma_LGh.min(-1))
  q_factor_LH = (gamma_LGh / k_factor_LG[..., None]).reshape(L, H)
  p['wq'] = _scale_heads(p['wq'], q_factor_LH, 1)
  p['wk'] = _scale_heads(p['wk'], k_factor_LG, 1)
  return p


def _clip_group(stacks, names: list[str], gamma_LH, cfg):
  """Blocks of one kind (one stack, or one per position of the pattern's repeating unit)."""
  unit = repeating_unit(names)
  single = len(unit) == 1
  stacks = [stacks] if single else list(stacks)
  out = []
  for j, (name, stack) in enumerate(zip(unit, stacks)):
    stack = dict(stack)
    for key in ('attn', 'attn2'):   # ScMoE's second attention shares the block's logit max
      if key in stack:
        stack[key] = clip_attention(stack[key], name, gamma_LH[j::len(unit)], cfg)
    out.append(stack)
  return out[0] if single else out


def qk_clip(params: dict, logit_max_LH, cfg, tau: float) -> dict:
  """Params with every over-threshold head's query/key projections rescaled (see module doc)."""
  gamma_LH = clip_factors(logit_max_LH, tau)
  names = layer_attentions(cfg)
  nd = cfg.num_dense_layers
  params = dict(params)
  if 'dense_blocks' in params:
    params['dense_blocks'] = _clip_group(params['dense_blocks'], names[:nd], gamma_LH[:nd], cfg)
  if 'moe_blocks' in params:
    params['moe_blocks'] = _clip_group(params['moe_blocks'], names[nd:], gamma_LH[nd:], cfg)
  return params
