"""Block layouts as a table: what a block holds and how it runs, shared by training and decoding.

A block's `apply(x_BTD, ops)` is written once against three operations that the caller supplies:
`ops.attend(key, x)` (pre-norm attention `p[key]` with norm `p[key + '_norm']`; training runs the
whole sequence, decoding one token against a cache), `ops.mlp(key, x)` (pre-norm dense SwiGLU
`p[key]`) and `ops.ffn(x)` (the block's own FFN under `p['ffn']`: dense SwiGLU or the MoE layer).
`attentions` and `mlps` name the block's extra sub-layers, from which its parameters, decode
caches, FLOPs and QK-clip follow (moejax.model, moejax.decode, moejax.flops, moejax.qk_clip).
Dense blocks always use the standard layout; `config.model.block` picks the MoE blocks' layout.
"""
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Block:
  apply: Callable           # (x_BTD, ops) -> x_BTD
  attentions: tuple         # attention sub-layers, each p[key] with its norm p[key + '_norm']
  mlps: tuple = ()          # dense SwiGLU sub-layers besides the FFN, likewise


def standard(x_BTD, ops):
  x_BTD = x_BTD + ops.attend('attn', x_BTD)
  return x_BTD + ops.ffn(x_BTD)


def scmoe(x_BTD, ops):
  """Shortcut-connected MoE (LongCat-Flash sec. 2.2): the MoE branch takes the first attention's
  output while a dense FFN, a second attention and a second dense FFN run on the main path, so the
  experts' token exchange can overlap that dense compute; the branch joins at the end."""
  x_BTD = x_BTD + ops.attend('attn', x_BTD)
  y_BTD = ops.ffn(x_BTD)
  x_BTD = x_BTD + ops.mlp('dense', x_BTD)
  x_BTD = x_BTD + ops.attend('attn2', x_BTD)
  x_BTD = x_BTD + ops.mlp('dense2', x_BTD)
  return x_BTD + y_BTD


BLOCKS = {
    'standard': Block(standard, attentions=('attn',)),
    'scmoe': Block(scmoe, attentions=('attn', 'attn2'), mlps=('dense', 'dense2')),
}


def block_layout(cfg, ffn: str) -> Block:
  """The layout of a block of FFN kind `ffn` ('dense' or 'moe')."""
  return BLOCKS[cfg.block] if ffn == 'moe' else BLOCKS['standard']
