"""Autoregressive decoding: one token per row through every layer, each attention layer reading
and updating its own cache (`Attention.init_cache` / `Attention.decode`), so a new token costs one
step instead of a forward pass over the whole prefix.

The caches mirror `params['dense_blocks']` / `params['moe_blocks']`: per block {'attn': cache}
(and 'attn2' for the ScMoE block's second attention), stacked over the layers of each scan stack,
one stack per position of the attention pattern's repeating unit, as in `model.forward`. Axis
letters: B batch, T positions, D model, V vocab, L MoE layers, E experts.
"""
import jax
import jax.numpy as jnp

from moejax import model, precision
from moejax.attention import ATTENTIONS
from moejax.blocks import block_layout
from moejax.layers import swiglu
from moejax.model import BlockOps, kind_groups, kind_layout, kind_stacks, rows, run_layers


def _block_caches(cfg, ffn: str, attention: str, num: int, batch: int, max_len: int, dtype):
  """The caches of `num` blocks of one kind and attention type, stacked along a leading axis."""
  one = ATTENTIONS[attention].init_cache(cfg.attn, batch, max_len, dtype)
  cache = {key: one for key in block_layout(cfg, ffn).attentions}
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num, *a.shape)), cache)


def _group_caches(cfg, ffn: str, batch: int, max_len: int, dtype):
  return kind_layout([_block_caches(cfg, ffn, g.attention, len(g.layers), batch, max_len, dtype)
                      for g in kind_groups(cfg, ffn)])


def init_caches(params, cfg, batch: int, max_len: int) -> dict:
  """Empty caches for `batch` sequences of up to `max_len` tokens, shaped like params' blocks."""
  dtype = precision.compute_dtype(cfg)
  return {f'{ffn}_blocks': _group_caches(cfg, ffn, batch, max_len, dtype)
          for ffn in ('dense', 'moe') if f'{ffn}_blocks' in params}


def decode_step(params, router_bias_LE, caches, token_B, pos, cfg, mesh):
  """Logits for the next token of each row (logits_BV, float32) after `token_B` at position `pos`
  (a scalar, the same for every row), and the updated caches. Equals `model.forward`'s logits at
  that position for the prefix fed so far. The block bodies are the training ones
  (moejax.blocks), with attention reading and writing the cache."""
  params = model.cast_params(params, cfg)
  mlp_einsum = precision.einsum_for(precision.fp8_mlp(cfg))

  def run_block(ffn_kind, ffn, attention, x_BD, p, cache):
    attend = lambda key, p_attn, h_BD: ATTENTIONS[attention].decode(p_attn, h_BD, cache[key], pos, cfg.attn)
    ops = BlockOps(p, cfg.norm_eps, attend, mlp_einsum, ffn)
    return block_layout(cfg, ffn_kind).apply(x_BD, ops), ops.extras   # extras: the new caches

  def dense_block(attention, x_BD, xs):
    p, cache = xs
    return run_block('dense', lambda p_ffn, h: swiglu(p_ffn, h, mlp_einsum), attention, x_BD, p, cache)

  def moe_block(attention, x_BD, xs):
    p, bias_E, cache = xs
    ffn = lambda p_ffn, h_BD: model.moe_ffn(p_ffn, bias_E, h_BD[:, None], cfg, mesh, ())[0][:, 0]
    return run_block('moe', ffn, attention, x_BD, p, cache)

  x_BD = params['embed'][token_B]
  xs_by_kind = {}
  if 'dense_blocks' in params:
    xs_by_kind['dense'] = tuple(zip(kind_stacks(params['dense_blocks'], cfg, 'dense'),
                                    kind_stacks(caches['dense_blocks'], cfg, 'dense')))
  if 'moe_blocks' in params:
    xs_by_kind['moe'] = tuple(zip(kind_stacks(params['moe_blocks'], cfg, 'moe'),
                                  (rows(router_bias_LE, g.kind_index) for g in kind_groups(cfg, 'moe')),
                                  kind_stacks(caches['moe_blocks'], cfg, 'moe')))
  block = lambda g, x, xs: dense_block(g.attention, x, xs) if g.kind == 'dense' else moe_block(g.attention, x, xs)
  x_BD, outs = run_layers(cfg, block, x_BD, xs_by_kind)
  new = {f'{k}_blocks': kind_layout(o) for k, o in outs.items()}
  return model.logits_from(params, x_BD, cfg), new   # forward's head: final norm, output multiplier


def prefill(params, router_bias_LE, caches, tokens_BT, cfg, mesh, start=0):
  """Feeds tokens_BT at positions start.. through `decode_step` (a scan over positions); returns
  the logits after each token (logits_BTV) and the caches."""
  def step(caches, token_pos):
    logits_BV, caches = decode_step(params, router_bias_LE, caches, *token_pos, cfg, mesh)
    return caches, logits_BV

  positions = start + jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)
  caches, logits_TBV = jax.lax.scan(step, caches, (tokens_BT.T, positions))
  return jnp.moveaxis(logits_TBV, 0, 1), caches
