"""The decoder: embedding -> dense blocks -> MoE blocks -> norm -> head, as pure functions.

Blocks of each kind are stacked along a leading 'layers' axis and run with `lax.scan`, so compile
time does not grow with depth. With a per-layer attention pattern (moejax.attention), each kind's
blocks are scanned over the pattern's repeating unit: their params are a list with one stack per
position in the unit (a plain stack when every block of the kind has the same attention), and the
layers past the last whole unit run after the scan. Axis letters: B batch, T sequence, D model, V vocab, E experts,
L layers, F FFN.
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import moe, precision, router, transfer
from moejax.attention import ATTENTIONS, layer_attentions, repeating_unit
from moejax.layers import dense, rms_norm, swiglu
from moejax.params import ParamSpec, stacked
from moejax.sharding import BATCH_AXES

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# Parameters that stay float32 whatever the compute dtype (norm scales and the router).
FLOAT32_PARAMS = ('norm', 'router')


def swiglu_specs(d_model: int, ffn_dim: int, cfg, axis: str = 'mlp'):
  s, out = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
  return {
      'w_gate': ParamSpec((d_model, ffn_dim), ('embed', axis), scale=s),
      'w_up': ParamSpec((d_model, ffn_dim), ('embed', axis), scale=s),
      'w_down': ParamSpec((ffn_dim, d_model), (axis, 'embed'), scale=out),
  }


def moe_specs(cfg):
  D, E, F = cfg.d_model, cfg.num_experts, cfg.expert_ffn_dim
  s, out = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
  specs = {
      'router': ParamSpec((D, router.num_routed(cfg)), ('embed', None), scale=s),
      'w_gate': ParamSpec((E, D, F), ('expert', 'embed', 'expert_mlp'), scale=s),
      'w_up': ParamSpec((E, D, F), ('expert', 'embed', 'expert_mlp'), scale=s),
      'w_down': ParamSpec((E, F, D), ('expert', 'expert_mlp', 'embed'), scale=out),
  }
  if cfg.num_shared_experts:
    specs['shared'] = swiglu_specs(D, cfg.num_shared_experts * F, cfg)
  return specs


def block_specs(cfg, ffn: str, attention: str):
  D = cfg.d_model
  specs = {
      'attn_norm': ParamSpec((D,), ('embed',), init='ones'),
      'attn': ATTENTIONS[attention].specs(cfg),
      'ffn_norm': ParamSpec((D,), ('embed',), init='ones'),
  }
  specs['ffn'] = swiglu_specs(D, cfg.dense_ffn_dim, cfg) if ffn == 'dense' else moe_specs(cfg)
  if ffn == 'moe' and cfg.block == 'scmoe':   # the second half of a shortcut-connected MoE block
    specs.update({
        'dense_norm': ParamSpec((D,), ('embed',), init='ones'),
        'dense': swiglu_specs(D, cfg.dense_ffn_dim, cfg),
        'attn2_norm': ParamSpec((D,), ('embed',), init='ones'),
        'attn2': ATTENTIONS[attention].specs(cfg),
        'dense2_norm': ParamSpec((D,), ('embed',), init='ones'),
        'dense2': swiglu_specs(D, cfg.dense_ffn_dim, cfg),
    })
  return specs


def model_specs(cfg):
  D, V = cfg.d_model, cfg.vocab_size
  specs = {'embed': ParamSpec((V, D), ('vocab', 'embed'), scale=1.0),
           'final_norm': ParamSpec((D,), ('embed',), init='ones')}
  names = layer_attentions(cfg)
  if cfg.num_dense_layers:
    specs['dense_blocks'] = group_specs(cfg, 'dense', names[:cfg.num_dense_layers])
  if cfg.num_layers > cfg.num_dense_layers:
    specs['moe_blocks'] = group_specs(cfg, 'moe', names[cfg.num_dense_layers:])
  if not cfg.tie_embeddings:
    specs['head'] = ParamSpec((D, V), ('embed', 'vocab'), scale=D ** -0.5)
  return specs


def group_specs(cfg, ffn: str, names: list[str]):
  """Blocks of one FFN kind: one stack per position of the attention pattern's repeating unit."""
  unit = repeating_unit(names)
  stacks = [stacked(block_specs(cfg, ffn, a), len(names[j::len(unit)])) for j, a in enumerate(unit)]
  return stacks[0] if len(unit) == 1 else stacks


def scan_layers(block, x_BTD, stacks, per_layer, names: list[str], unroll):
  """Runs block(attention_name, x, params or (params, per_layer value)) over the layers of one kind.

  Scans the repeating unit of `names` over its whole repetitions, then runs the remaining
  layers; per-layer outputs come back stacked in layer order."""
  unit = repeating_unit(names)
  U, n = len(unit), len(names)
  stacks = (stacks,) if U == 1 else stacks
  xs = tuple(stacks[j] if per_layer is None else (stacks[j], per_layer[j::U]) for j in range(U))
  reps = n // U

  def unit_step(x_BTD, xs_unit):
    outs = []
    for name, xs_j in zip(unit, xs_unit):
      x_BTD, out = block(name, x_BTD, xs_j)
      outs.append(out)
    return x_BTD, outs

  head = jax.tree.map(lambda a: a[:reps], xs)
  x_BTD, outs = jax.lax.scan(unit_step, x_BTD, head, unroll=unroll)
  # [reps, ...] per unit position -> [reps * U, ...] in layer order
  outs = jax.tree.map(lambda *o: jnp.stack(o, 1).reshape(-1, *o[0].shape[1:]), *outs)
  tail = []
  for j in range(n - reps * U):
    x_BTD, out = block(unit[j], x_BTD, jax.tree.map(lambda a: a[reps], xs[j]))
    tail.append(out)
  if tail:
    outs = jax.tree.map(lambda o, *t: jnp.concatenate([o, jnp.stack(t)]), outs, *tail)
  return x_BTD, outs


def moe_layer_leaf(moe_blocks, path: tuple, cfg):
  """One leaf of every MoE layer (params or grads), stacked in layer order [L, ...], whether the
  attention pattern stacks the blocks as one scan stack or one per position of its unit."""
  names = layer_attentions(cfg)[cfg.num_dense_layers:]
  U = len(repeating_unit(names))
  stacks = (moe_blocks,) if U == 1 else moe_blocks
  leaves = [functools.reduce(lambda t, k: t[k], path, stack) for stack in stacks]
  if U == 1:
    return leaves[0]
  return jnp.stack([leaves[l % U][l // U] for l in range(len(names))])


def num_moe_layers(cfg) -> int:
  return cfg.num_layers - cfg.num_dense_layers


def _router_loss_grads(x_TD, router_DE, bias_E, cfg, seq_len: int) -> dict:
  """Direct gradients of this layer's balance loss and z-loss (unit weight) w.r.t. its router,
  for the gradient-norm ratio; inputs are held fixed, so nothing flows back from here."""
  x_TD, router_DE = jax.lax.stop_gradient(x_TD), jax.lax.stop_gradient(router_DE)
  grads = {'router_grad_balance': jax.grad(
      lambda w: router.route(x_TD, w, bias_E, cfg, seq_len).balance_loss)(router_DE)}
  if cfg.z_loss_weight:
    grads['router_grad_z'] = jax.grad(lambda w: router.route(x_TD, w, bias_E, cfg, seq_len).z_loss)(router_DE)
  return grads


def moe_ffn(p, bias_E, x_BTD, cfg, mesh, batch_axes):
  """Routed (+ zero-computation) + shared experts. Returns y_BTD and this layer's aux values."""
  B, T, D = x_BTD.shape
  x_TD = x_BTD.reshape(B * T, D)
  routing = router.route(x_TD, p['router'], bias_E, cfg, seq_len=T)
  y_TD, dropped = moe.routed_experts(x_TD, routing, p['w_gate'], p['w_up'], p['w_down'], cfg, mesh,
                                     batch_axes)
  y_TD = y_TD * routed_variance_scale(cfg)
  if cfg.num_zero_experts:   # identity experts: the token itself, weighted, at no expert FLOPs
    zero_weight_T = jnp.sum(jnp.where(routing.expert_TK >= cfg.num_experts, routing.weight_TK, 0.0), -1)
    y_TD = y_TD + x_TD * zero_weight_T[:, None].astype(x_TD.dtype)
  y_BTD = y_TD.reshape(B, T, D)
  if 'shared' in p:
    y_BTD = y_BTD + swiglu(p['shared'], x_BTD, precision.einsum_for(precision.fp8_mlp(cfg)))
  aux = {'load_E': routing.load_E, 'balance_loss': routing.balance_loss,
         'z_loss': routing.z_loss, 'dropped': dropped, **routing.stats,
         **_router_loss_grads(x_TD, p['router'], bias_E, cfg, T)}
  return y_BTD, aux


def routed_variance_scale(cfg) -> float:
  """Variance alignment (LongCat-Flash sec. 2.3, 'variance compensation'): with top-k weights
  normalised to sum to 1, K independent experts' outputs average, so the routed output's variance
  at init falls as 1/K while each expert's falls with its width F. Scaling by K (by 2 for
  unnormalised sigmoid weights ~0.5) keeps it at that of a dense SwiGLU of width K*F, whatever the
  granularity at fixed active parameters."""
  if not cfg.variance_alignment:
    return 1.0
  return float(cfg.top_k) if cfg.norm_topk else 2.0


def hidden_z_loss(x_BTD):
  """LongCat-Flash's hidden z-loss: mean over tokens of log(sum_i exp|h_i|)^2 (curbs massive
  activations in the residual stream)."""
  return jnp.mean(jax.nn.logsumexp(jnp.abs(x_BTD.astype(jnp.float32)), axis=-1) ** 2)


def _residual_aux(x_BTD, cfg, logit_max_H) -> dict:
  aux = {'resid_max': jnp.max(jnp.abs(x_BTD)).astype(jnp.float32), 'attn_logit_max': logit_max_H}
  if cfg.hidden_z_loss_weight:
    aux['hidden_z_loss'] = hidden_z_loss(x_BTD)
  return aux


def cast_params(params, cfg):
  """Every parameter in the compute dtype, except FLOAT32_PARAMS."""
  dtype = precision.compute_dtype(cfg)
  return jax.tree_util.tree_map_with_path(
      lambda path, w: w if any(n in jax.tree_util.keystr(path) for n in FLOAT32_PARAMS)
      else w.astype(dtype), params)


def forward(params, router_bias_LE, tokens_BT, cfg, mesh, batch_axes=BATCH_AXES, segment_ids_BT=None):
  """Returns logits_BTV (float32) and aux: per-layer values stacked over layers; MoE layers' under
  their own keys, and per-block values (`resid_max`, `hidden_z_loss`, `attn_logit_max` [L, heads])
  under 'blocks'. With `cfg.document_mask`, attention stays within `segment_ids_BT`'s documents.

  Activations between blocks are split over `batch_axes` (those the mesh has) and whole over the
  rest; weights are used as sharded and the compiler gathers them (fsdp) or splits the matmuls
  (tensor)."""
  params = cast_params(params, cfg)
  batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  act = NamedSharding(mesh, P(batch_axes))
  policy = REMAT_POLICIES[cfg.remat]
  names = layer_attentions(cfg)

  mlp_einsum = precision.einsum_for(precision.fp8_mlp(cfg))

  segments = segment_ids_BT if cfg.document_mask else None

  def attend(attention, p, norm, x_BTD):
    return ATTENTIONS[attention].apply(p, rms_norm(x_BTD, norm, cfg.norm_eps), cfg, segments)

  def block(attention, x_BTD, p):
    x_BTD = jax.lax.with_sharding_constraint(x_BTD, act)
    y_BTD, logit_max_H = attend(attention, p['attn'], p['attn_norm'], x_BTD)
    x_BTD = x_BTD + y_BTD
    return x_BTD, rms_norm(x_BTD, p['ffn_norm'], cfg.norm_eps), logit_max_H

  def dense_block(attention, x_BTD, p):
    x_BTD, h, logit_max_H = block(attention, x_BTD, p)
    x_BTD = x_BTD + swiglu(p['ffn'], h, mlp_einsum)
    return x_BTD, _residual_aux(x_BTD, cfg, logit_max_H)

  def moe_block(attention, x_BTD, p_and_bias):
    p, bias_E = p_and_bias
    x_BTD, h, logit_max_H = block(attention, x_BTD, p)
    y, aux = moe_ffn(p['ffn'], bias_E, h, cfg, mesh, batch_axes)
    if cfg.block == 'scmoe':
      # Shortcut-connected MoE (LongCat-Flash sec. 2.2): the MoE branch takes the first attention's
      # output while a dense FFN, a second attention and a second dense FFN run on the main path,
      # so the experts' token exchange can overlap that dense compute; the branch joins at the end.
      x_BTD = x_BTD + swiglu(p['dense'], rms_norm(x_BTD, p['dense_norm'], cfg.norm_eps), mlp_einsum)
      y2_BTD, logit_max2_H = attend(attention, p['attn2'], p['attn2_norm'], x_BTD)
      x_BTD = x_BTD + y2_BTD
      x_BTD = x_BTD + swiglu(p['dense2'], rms_norm(x_BTD, p['dense2_norm'], cfg.norm_eps), mlp_einsum)
      logit_max_H = jnp.maximum(logit_max_H, logit_max2_H)
    x_BTD = x_BTD + y
    return x_BTD, {**aux, **_residual_aux(x_BTD, cfg, logit_max_H)}

  if policy is not None:
    dense_block = jax.checkpoint(dense_block, policy=policy, static_argnums=(0,))
    moe_block = jax.checkpoint(moe_block, policy=policy, static_argnums=(0,))

  # Look up whole rows (gather the table over fsdp first, ZeRO-3 style): rows split over D would
  # leave activations split over D, which the compiler can re-split over the batch only by
  # replicating them.
  embed_VD = jax.lax.with_sharding_constraint(params['embed'], NamedSharding(mesh, P(P.UNCONSTRAINED, None)))
  x_BTD = jax.lax.with_sharding_constraint(embed_VD[tokens_BT], act)
  aux, block_aux = {}, []
  nd = cfg.num_dense_layers
  if 'dense_blocks' in params:
    x_BTD, dense_aux = scan_layers(dense_block, x_BTD, params['dense_blocks'], None,
                                   names[:nd], cfg.scan_unroll)
    block_aux.append(dense_aux)
  if 'moe_blocks' in params:
    x_BTD, aux = scan_layers(moe_block, x_BTD, params['moe_blocks'], router_bias_LE, names[nd:],
                             cfg.scan_unroll)
    block_aux.append({k: aux.pop(k) for k in list(aux)
                      if k in ('resid_max', 'hidden_z_loss', 'attn_logit_max')})
  aux['blocks'] = jax.tree.map(lambda *xs: jnp.concatenate(xs), *block_aux)
  x_BTD = rms_norm(x_BTD, params['final_norm'], cfg.norm_eps)
  head_DV = params['embed'].T if cfg.tie_embeddings else params['head']
  logits_BTV = dense(x_BTD, head_DV).astype(jnp.float32)
  if transfer.enabled(cfg):   # muP's output multiplier 1/m
    logits_BTV = logits_BTV * transfer.output_multiplier(cfg)
  return logits_BTV, aux


def loss_fn(params, router_bias_LE, batch, cfg, mesh, balance_coef_L=None, batch_axes=BATCH_AXES):
  """Mean next-token cross-entropy over unmasked targets, plus the weighted auxiliary losses.

  `balance_coef_L` (per MoE layer) replaces `balance_loss_weight` when the coefficient adapts."""
  logits_BTV, aux = forward(params, router_bias_LE, batch['inputs'], cfg, mesh, batch_axes,
                            segment_ids_BT=batch.get('segment_ids'))
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  nll_BT = -jnp.take_along_axis(logp_BTV, batch['targets'][..., None], axis=-1)[..., 0]
  mask_BT = batch['loss_mask']
  lm_loss = jnp.sum(nll_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)
  loss = lm_loss
  if 'balance_loss' in aux:
    coef_L = cfg.balance_loss_weight if balance_coef_L is None else balance_coef_L
    loss = loss + jnp.mean(coef_L * aux['balance_loss'])
    loss = loss + cfg.z_loss_weight * aux['z_loss'].mean()
  if cfg.hidden_z_loss_weight:
    loss = loss + cfg.hidden_z_loss_weight * aux['blocks']['hidden_z_loss'].mean()
  return loss, {'lm_loss': lm_loss, **aux}
