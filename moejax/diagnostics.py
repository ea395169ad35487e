"""Router and stability diagnostics: what the train step returns per layer -> logged summaries.

Per MoE layer (L) the step returns expert loads and, at log steps only (the train step's
diagnostics variant), router entropy, score margins, real experts per token, the gradient-norm ratio R = |dL_balance/d router| / |dL_lm/d router| (direct gradients of the
layer's own losses), and per block the max residual activation. At log steps the expert weights'
pairwise cosine similarity is added (rising similarity = experts homogenising), and expert health:
each expert's output norm (on a probe of the batch's tokens), the norm of its parameter update, and
the routing churn (fraction of the batch's tokens whose set of experts the step's update changed).
"""
import jax
import jax.numpy as jnp
import numpy as np

ROUTER_STATS = ('entropy', 'top1_margin', 'topk_margin', 'active_experts_per_token')
HEALTH = ('routing_churn', 'expert_out_norm', 'expert_update_norm')   # per layer [L] or [L, E]


def gradient_norm_ratio(grad_router_LDE, router_grads: dict, balance_coef_L, z_loss_weight: float):
  """R per layer for the balance loss as weighted now, and per unit balance coefficient.
  `router_grads`: the layers' own unit-weight loss gradients (moejax.model.router_grads)."""
  L = grad_router_LDE.shape[0]
  g_bal_unit = router_grads['balance'] / L
  g_bal = balance_coef_L[:, None, None] * g_bal_unit
  g_lm = grad_router_LDE - g_bal
  if 'z' in router_grads:
    g_lm = g_lm - z_loss_weight / L * router_grads['z']
  norm = lambda g: jnp.sqrt(jnp.sum(g * g, axis=(1, 2)))
  lm_L = jnp.maximum(norm(g_lm), 1e-30)
  return norm(g_bal) / lm_L, norm(g_bal_unit) / lm_L


def adapt_balance_coef(coef_L, ratio_L, target: float, max_coef: float):
  """Shrinks a layer's coefficient when R exceeds the target; lets it recover slowly otherwise."""
  factor_L = jnp.clip(target / jnp.maximum(ratio_L, 1e-30), 0.5, 1.05)
  return jnp.minimum(coef_L * factor_L, max_coef)


def expert_similarity(moe_params) -> dict:
  """Mean and max pairwise cosine similarity between experts' flattened weights, per layer."""
  w_LEX = jnp.concatenate([moe_params[k].reshape(*moe_params[k].shape[:2], -1)
                           for k in ('w_gate', 'w_up', 'w_down')], axis=-1)
  w_LEX = w_LEX / jnp.linalg.norm(w_LEX, axis=-1, keepdims=True)
  cos_LEE = jnp.einsum('lex,lfx->lef', w_LEX, w_LEX)
  E = cos_LEE.shape[-1]
  off_LEE = jnp.where(jnp.eye(E, dtype=bool), jnp.nan, cos_LEE)
  return {'expert_cos_mean': jnp.nanmean(off_LEE, axis=(1, 2)),
          'expert_cos_max': jnp.nanmax(off_LEE, axis=(1, 2))}


PROBE_TOKENS = 256   # tokens the expert output norms are measured on (every expert, densely)


def expert_output_norm(x_TD, expert_TK, w_gate_EDF, w_up_EDF, w_down_EFD, probe: int = PROBE_TOKENS):
  """Mean |FFN_e(x)| over the probe tokens routed to expert e (NaN for an expert none went to)."""
  E = w_gate_EDF.shape[0]
  x_PD = x_TD[:probe].astype(jnp.float32)
  f32 = lambda w: w.astype(jnp.float32)
  h_PEF = jax.nn.silu(jnp.einsum('pd,edf->pef', x_PD, f32(w_gate_EDF))) * jnp.einsum('pd,edf->pef', x_PD, f32(w_up_EDF))
  norm_PE = jnp.linalg.norm(jnp.einsum('pef,efd->ped', h_PEF, f32(w_down_EFD)), axis=-1)
  chosen_PE = jax.nn.one_hot(expert_TK[:probe], E, dtype=jnp.float32).sum(1)
  count_E = chosen_PE.sum(0)
  return jnp.where(count_E > 0, (norm_PE * chosen_PE).sum(0) / jnp.maximum(count_E, 1.0), jnp.nan)


def expert_update_norm(old_moe, new_moe):
  """|W_new - W_old| per expert, over its gate, up and down matrices: {'w_gate': [L, E, ...], ...}."""
  sq = [jnp.sum(jnp.square(new_moe[k].astype(jnp.float32) - old_moe[k].astype(jnp.float32)),
                axis=tuple(range(2, new_moe[k].ndim))) for k in ('w_gate', 'w_up', 'w_down')]
  return jnp.sqrt(sum(sq))


def routing_churn(route_fn, x_LTD, old, new):
  """Fraction of the same tokens whose set of experts changed between two router states.
  route_fn(x_TD, router_DE, bias_E) -> expert_TK; old, new: (router_LDE, bias_LE)."""
  def one(x_TD, w_old, b_old, w_new, b_new):
    E = b_old.shape[-1] + 1   # + 1: the 'no expert' id of threshold routing
    a_TE = jax.nn.one_hot(route_fn(x_TD, w_old, b_old), E).sum(1)
    b_TE = jax.nn.one_hot(route_fn(x_TD, w_new, b_new), E).sum(1)
    return jnp.mean(jnp.any(a_TE[:, :-1] != b_TE[:, :-1], axis=-1).astype(jnp.float32))
  return jax.vmap(one)(x_LTD, *old, *new)


def bias_oscillation(bias_SLE) -> float:
  """Variance of each expert's bias over the logged steps S, mean over experts and layers."""
  return float(np.mean(np.var(np.asarray(bias_SLE, np.float64), axis=0)))


def maxvio_L(load_LE) -> np.ndarray:
  """(max load - mean load) / mean load per layer (Wang et al., arXiv 2408.15664)."""
  mean_L = load_LE.mean(-1)
  return (load_LE.max(-1) - mean_L) / np.maximum(mean_L, 1e-9)


def summarize(out: dict, window_load_LE, num_real: int) -> tuple[dict, dict]:
  """Host-side: per-layer arrays -> (scalar record entries, per-layer lists for layers.jsonl)."""
  record, layers = {}, {}
  if 'load_LE' in out:
    load_LE, window_LE = np.asarray(out['load_LE'])[:, :num_real], np.asarray(window_load_LE)[:, :num_real]
    layers['maxvio'] = maxvio_L(load_LE)
    layers['maxvio_window'] = maxvio_L(window_LE)
    layers['dead_experts'] = (window_LE == 0).sum(-1)
    layers['load_fraction'] = window_LE / np.maximum(window_LE.sum(-1, keepdims=True), 1e-9)
    record['moe/maxvio'] = float(layers['maxvio'].max())
    record['moe/maxvio_global'] = float(layers['maxvio_window'].max())
    record['moe/dead_experts'] = int(layers['dead_experts'].sum())
    bias_LE = np.asarray(out['router_bias'])[:, :num_real]
    record.update({'moe/bias_mean': float(bias_LE.mean()), 'moe/bias_std': float(bias_LE.std()),
                   'moe/bias_max': float(np.abs(bias_LE).max())})
    layers['router_bias'] = bias_LE   # per expert, for the oscillation of the bias over time
    if 'router_momentum' in out:
      record['moe/bias_momentum_abs'] = float(np.abs(np.asarray(out['router_momentum'])).mean())
    for k in HEALTH:
      if k in out:
        layers[k] = np.asarray(out[k])
        record[f'moe/{k}'] = float(np.nanmean(layers[k]))
    if 'expert_update_norm' in layers:   # the busiest expert's update against the mean one
      u_LE = layers['expert_update_norm']
      record['moe/expert_update_norm_max_ratio'] = float((u_LE.max(-1) / np.maximum(u_LE.mean(-1), 1e-30)).max())
    for k in ROUTER_STATS + ('grad_norm_ratio', 'grad_norm_ratio_unit', 'balance_coef',
                             'expert_cos_mean', 'expert_cos_max'):
      if k in out:
        layers[k] = np.asarray(out[k])
    for k in ROUTER_STATS:
      if k in layers:
        record[f'moe/{k}'] = float(layers[k].mean())
    if 'grad_norm_ratio' in layers:   # log steps only
      record['moe/grad_norm_ratio'] = float(layers['grad_norm_ratio'].max())
      record['moe/grad_norm_ratio_unit'] = float(layers['grad_norm_ratio_unit'].max())
    if 'expert_cos_mean' in layers:
      record['moe/expert_cos_mean'] = float(layers['expert_cos_mean'].mean())
      record['moe/expert_cos_max'] = float(layers['expert_cos_max'].max())
    if 'real_experts_hist' in out:
      layers['real_experts_hist'] = np.asarray(out['real_experts_hist'])
  if 'resid_max' in out:
    layers['resid_max'] = np.asarray(out['resid_max'])
    record['resid/max_abs'] = float(layers['resid_max'].max())
  if 'attn_logit_max' in out:   # [L, heads]; NaN for layers without softmax logits (KDA)
    logit_LH = np.asarray(out['attn_logit_max'], np.float64)
    softmax_L = ~np.isnan(logit_LH).all(-1)
    layers['attn_logit_max'] = np.where(softmax_L, np.nanmax(np.where(softmax_L[:, None], logit_LH, 0.0), -1), np.nan)
    if softmax_L.any():
      record['attn/logit_max'] = float(np.nanmax(logit_LH))
  return record, {k: _json_list(np.round(v, 5)) for k, v in layers.items()}


def _json_list(a: np.ndarray) -> list:
  """NaN -> None, so the per-layer lists stay valid JSON."""
  a = np.asarray(a)
  return np.where(np.isnan(a), None, a).tolist() if a.dtype.kind == 'f' else a.tolist()
