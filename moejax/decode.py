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
from moejax.attention import ATTENTIONS, layer_attentions, repeating_unit
from moejax.layers import dense, rms_norm, swiglu


def _block_caches(cfg, ffn: str, attention: str, num: int, batch: int, max_len: int, dtype):
  """The caches of `num` blocks of one kind and attention type, stacked along a leading axis."""
  one = ATTENTIONS[attention].init_cache(cfg, batch, max_len, dtype)
  cache = {'attn': one, 'attn2': one} if ffn == 'moe' and cfg.block == 'scmoe' else {'attn': one}
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num, *a.shape)), cache)


def _group_caches(cfg, ffn: str, names: list[str], batch: int, max_len: int, dtype):
  unit = repeating_unit(names)
  stacks = [_block_caches(cfg, ffn, a, len(names[j::len(unit)]), batch, max_len, dtype)
            for j, a in enumerate(unit)]
  return stacks[0] if len(unit) == 1 else stacks


def init_caches(params, cfg, batch: int, max_len: int) -> dict:
  """Empty caches for `batch` sequences of up to `max_len` tokens, shaped like params' blocks."""
  names, nd = layer_attentions(cfg), cfg.num_dense_layers
  dtype = precision.compute_dtype(cfg)
  caches = {}
  if 'dense_blocks' in params:
    caches['dense_blocks'] = _group_caches(cfg, 'dense', names[:nd], batch, max_len, dtype)
  if 'moe_blocks' in params:
    caches['moe_blocks'] = _group_caches(cfg, 'moe', names[nd:], batch, max_len, dtype)
  return caches


def _run_layers(block, x_BD, stacks, caches, per_layer, names: list[str]):
  """block(name, x, params, cache, per-layer value) -> (x, cache) over the layers of one kind:
  the repeating unit scanned over its whole repetitions, then the remaining layers (as
  `model.scan_layers`). Returns x and the new caches in the structure of `caches`."""
  unit = repeating_unit(names)
  U, n = len(unit), len(names)
  reps = n // U
  if U == 1:
    stacks, caches = (stacks,), (caches,)
  per = tuple(None if per_layer is None else per_layer[j::U] for j in range(U))
  xs = tuple(zip(stacks, caches, per))

  def unit_step(x_BD, xs_unit):
    new = []
    for name, (p, cache, v) in zip(unit, xs_unit):
      x_BD, cache = block(name, x_BD, p, cache, v)
      new.append(cache)
    return x_BD, new

  x_BD, new = jax.lax.scan(unit_step, x_BD, jax.tree.map(lambda a: a[:reps], xs))
  for j in range(n - reps * U):   # layers past the last whole unit: index `reps` of stack j
    x_BD, cache = block(unit[j], x_BD, *jax.tree.map(lambda a: a[reps], xs[j]))
    new[j] = jax.tree.map(lambda a, c: jnp.concatenate([a, c[None]]), new[j], cache)
  return x_BD, new[0] if U == 1 else new


def decode_step(params, router_bias_LE, caches, token_B, pos, cfg, mesh):
  """Logits for the next token of each row (logits_BV, float32) after `token_B` at position `pos`
  (a scalar, the same for every row), and the updated caches. Equals `model.forward`'s logits at
  that position for the prefix fed so far."""
  params = model.cast_params(params, cfg)
  names, nd = layer_attentions(cfg), cfg.num_dense_layers
  mlp_einsum = precision.einsum_for(precision.fp8_mlp(cfg))
  ffn = lambda p, norm, x_BD: swiglu(p, rms_norm(x_BD, norm, cfg.norm_eps), mlp_einsum)

  def attend(attention, p, norm, x_BD, cache):
    return ATTENTIONS[attention].decode(p, rms_norm(x_BD, norm, cfg.norm_eps), cache, pos, cfg)

  def dense_block(attention, x_BD, p, cache, _):
    y_BD, c = attend(attention, p['attn'], p['attn_norm'], x_BD, cache['attn'])
    x_BD = x_BD + y_BD
    return x_BD + ffn(p['ffn'], p['ffn_norm'], x_BD), {'attn': c}

  def moe_block(attention, x_BD, p, cache, bias_E):
    y_BD, c = attend(attention, p['attn'], p['attn_norm'], x_BD, cache['attn'])
    x_BD = x_BD + y_BD
    h_B1D = rms_norm(x_BD, p['ffn_norm'], cfg.norm_eps)[:, None]
    moe_BD = model.moe_ffn(p['ffn'], bias_E, h_B1D, cfg, mesh, ())[0][:, 0]
    new = {'attn': c}
    if cfg.block == 'scmoe':   # the dense path of the shortcut-connected block (model.forward)
      x_BD = x_BD + ffn(p['dense'], p['dense_norm'], x_BD)
      y2_BD, new['attn2'] = attend(attention, p['attn2'], p['attn2_norm'], x_BD, cache['attn2'])
      x_BD = x_BD + y2_BD
      x_BD = x_BD + ffn(p['dense2'], p['dense2_norm'], x_BD)
    return x_BD + moe_BD, new

  x_BD = params['embed'][token_B]
  new = {}
  if 'dense_blocks' in params:
    x_BD, new['dense_blocks'] = _run_layers(dense_block, x_BD, params['dense_blocks'],
                                            caches['dense_blocks'], None, names[:nd])
  if 'moe_blocks' in params:
    x_BD, new['moe_blocks'] = _run_layers(moe_block, x_BD, params['moe_blocks'],
                                          caches['moe_blocks'], router_bias_LE, names[nd:])
  x_BD = rms_norm(x_BD, params['final_norm'], cfg.norm_eps)
  head_DV = params['embed'].T if cfg.tie_embeddings else params['head']
  return dense(x_BD, head_DV).astype(jnp.float32), new


def prefill(params, router_bias_LE, caches, tokens_BT, cfg, mesh, start=0):
  """Feeds tokens_BT at positions start.. through `decode_step` (a scan over positions); returns
  the logits after each token (logits_BTV) and the caches."""
  def step(caches, token_pos):
    logits_BV, caches = decode_step(params, router_bias_LE, caches, *token_pos, cfg, mesh)
    return caches, logits_BV

  positions = start + jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)
  caches, logits_TBV = jax.lax.scan(step, caches, (tokens_BT.T, positions))
  return jnp.moveaxis(logits_TBV, 0, 1), caches
