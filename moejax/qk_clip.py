"""QK-clip (MuonClip, Kimi K2 technical report, arXiv 2507.20534, sec. 2.1): after each optimizer
step, every attention head h whose largest logit S_h in that step exceeded the threshold tau has its
query and key projections rescaled so the logit scales by gamma_h = min(1, tau / S_h). How each
attention type rescales its projections is its table entry's `qk_clip` (moejax.attention: GQA,
MHA, SWA per head or group, MLA's no-RoPE and RoPE parts); KDA has no softmax logits (its logit max
is NaN, and NaN never clips) and NSA refuses QK-clip. Heads that stayed under tau are untouched.
`config.optim.qk_clip` = tau; 0 turns it off. Axis letters: L layers, H query heads.
"""
import jax.numpy as jnp

from moejax.attention import ATTENTIONS
from moejax.blocks import block_layout
from moejax.model import kind_groups, kind_layout, kind_stacks, rows


def clip_factors(logit_max_H, tau: float):
  """gamma_h = min(1, tau / S_h); 1 where S_h is NaN or not above tau."""
  return jnp.where(logit_max_H > tau, tau / jnp.where(logit_max_H > tau, logit_max_H, 1.0), 1.0)


def _clip_group(stacks, ffn: str, gamma_LH, cfg):
  """Blocks of one kind (one stack, or one per position of the pattern's repeating unit); every
  attention of a block (ScMoE has two) takes the block's logit max."""
  out = []
  for g, stack in zip(kind_groups(cfg, ffn), kind_stacks(stacks, cfg, ffn)):
    stack = dict(stack)
    for key in block_layout(cfg, ffn).attentions:
      stack[key] = ATTENTIONS[g.attention].qk_clip(stack[key], rows(gamma_LH, g.layers), cfg.attn)
    out.append(stack)
  return kind_layout(out)


def qk_clip(params: dict, logit_max_LH, cfg, tau: float, mtp_logit_max_KH=None) -> dict:
  """Params with every over-threshold head's query/key projections rescaled (see module doc);
  `mtp_logit_max_KH`: the MTP modules' blocks' (moejax.mtp), one stack of the last layer's kind."""
  gamma_LH = clip_factors(logit_max_LH, tau)
  params = dict(params)   # gamma_LH is over all layers; each group takes its layers' rows
  for ffn in ('dense', 'moe'):
    if f'{ffn}_blocks' in params:
      params[f'{ffn}_blocks'] = _clip_group(params[f'{ffn}_blocks'], ffn, gamma_LH, cfg)
  if mtp_logit_max_KH is not None:
    gamma_KH, modules = clip_factors(mtp_logit_max_KH, tau), dict(params['mtp_blocks'])
    block = dict(modules['block'])
    for key in block_layout(cfg, cfg.layer_kinds[-1]).attentions:
      block[key] = ATTENTIONS[cfg.layer_attentions[-1]].qk_clip(block[key], gamma_KH, cfg.attn)
    params['mtp_blocks'] = {**modules, 'block': block}
  return params
