"""Routing and load balancing: top-k routing, the balancing losses, the bias update, router stats.

Axis letters: T tokens, D model, E routed experts (real + zero-computation), K top-k, L MoE layers.

- Routing (DeepSeek-V3, arXiv 2412.19437 sec. 2.1.2): float32 scores (sigmoid or softmax), top-k on
  scores + a selection-only bias, combine weights from the unbiased scores normalised over the
  top-k and multiplied by `routed_scaling`.
- Auxiliary-loss-free balancing (Wang et al., arXiv 2408.15664): after each step the bias moves
  towards each expert's target load, by `rate * sign(target - load)` (DeepSeek-V3) or
  proportionally, `rate * (target - load) / (K*T)` (LongCat-Flash, arXiv 2509.01322 eq. 3).
- Zero-computation experts (LongCat-Flash sec. 2.1): `num_zero_experts` identity experts join the
  pool; real experts aim at `target_active_experts * T / E_real` tokens each, so the average number
  of real experts per token is steered to that target; zero experts' biases stay fixed.
- Balance losses: sequence-wise (DeepSeek-V3 eqs. 17-20, f_i P_i summed over experts and averaged
  over sequences) or global-batch (Qiu et al. "Demons in the detail", Qwen, arXiv 2501.11873:
  the same f_i P_i with frequencies counted over the whole global batch); router z-loss (ST-MoE,
  arXiv 2202.08906 eq. 5: mean of logsumexp(logits)^2).
"""
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from moejax import balancers
from moejax.errors import check, non_negative, one_of


@dataclass(frozen=True)
class RouterConfig:
  """What routing and the bias update depend on: `model.router`, the headline `model.num_experts`,
  `top_k` and `bias_update_rate`, and `model.loss.balance_scope` (how the balance loss groups tokens)."""
  num_experts: int
  top_k: int
  score: str = 'sigmoid'
  norm_topk: bool = True
  routed_scaling: float = 1.0
  num_zero_experts: int = 0
  target_active_experts: float = 0.0
  bias_update_rate: float = 1e-2
  bias_update_mode: str = 'sign'
  bias_update_schedule: str = 'constant'
  bias_update_final: float = 0.1
  bias_center: bool = False
  balance_scope: str = 'sequence'
  n_group: int = 1             # > 1: group-limited routing (DeepSeek-V2/V3), experts in n_group groups
  topk_group: int = 1          # ... of which a token may use the topk_group best
  group_score: str = 'top2_sum'  # a group's score: sum of its top-2 selection scores (V3) or 'max' (V2)
  force_balance: bool = False  # replace the top-k choice by a balanced assignment (benchmarks)
  balancer: str = 'bias'       # the bias update of top-k routing: 'bias' | 'quantile' | 'smebu' (moejax.balancers)
  quantile_ema: float = 0.0    # quantile: weight kept on the old bias at each step
  smebu_kappa: float = 2.0     # smebu: tanh(kappa * relative load error)
  smebu_momentum: float = 0.9  # smebu: momentum of the bias velocity
  routing: str = 'topk'        # 'topk' (token choice) or 'threshold' (expert-threshold routing)
  threshold_ema: float = 0.9   # threshold: weight kept on the old threshold at each step
  threshold_max_k: int = 0     # threshold: most experts a token may use (0: 2 * top_k)
  zero_expert_kind: str = 'identity'  # zero-computation experts return the token ('identity') or 0 ('null')

  def __post_init__(self):
    check(isinstance(self.num_experts, int) and self.num_experts >= 1, 'model.num_experts',
          f'must be >= 1, got {self.num_experts}')
    check(isinstance(self.num_zero_experts, int) and self.num_zero_experts >= 0,
          'model.router.num_zero_experts', f'must be >= 0, got {self.num_zero_experts}')
    check(isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_routed, 'model.top_k',
          f'{self.top_k} must be between 1 and model.num_experts ({self.num_experts})'
          + (f' + model.router.num_zero_experts ({self.num_zero_experts})' if self.num_zero_experts else ''))
    one_of(self.score, ('sigmoid', 'softmax'), 'model.router.score')
    non_negative(self.bias_update_rate, 'model.bias_update_rate')
    one_of(self.bias_update_mode, ('sign', 'proportional'), 'model.router.bias_update_mode')
    one_of(self.bias_update_schedule, ('constant', 'linear'), 'model.router.bias_update_schedule')
    one_of(self.balance_scope, ('sequence', 'global'), 'model.loss.balance_scope')
    one_of(self.group_score, ('top2_sum', 'max'), 'model.router.group_score')
    one_of(self.balancer, ('bias', 'quantile', 'smebu'), 'model.router.balancer')
    one_of(self.routing, ('topk', 'threshold'), 'model.router.routing')
    one_of(self.zero_expert_kind, ('identity', 'null'), 'model.router.zero_expert_kind')
    for name in ('quantile_ema', 'smebu_momentum', 'threshold_ema'):
      check(0.0 <= getattr(self, name) < 1.0, f'model.router.{name}', f'must be in [0, 1), got {getattr(self, name)}')
    check(self.smebu_kappa > 0, 'model.router.smebu_kappa', f'must be positive, got {self.smebu_kappa}')
    if self.balancer != 'bias' or self.routing != 'topk':
      what = f'balancer {self.balancer!r}' if self.balancer != 'bias' else "routing 'threshold'"
      check(self.n_group == 1, 'model.router.n_group', f'group-limited routing with {what}')
    if self.balancer == 'smebu':
      check(not self.num_zero_experts, 'model.router.balancer',
            "'smebu' centres its updates, which would cancel the steering of zero-computation experts")
    if self.routing == 'threshold':
      check(self.balancer == 'bias', 'model.router.balancer',
            f"threshold routing sets its own thresholds; {self.balancer!r} does not apply")
      check(not self.num_zero_experts, 'model.router.routing', 'threshold routing with zero-computation experts')
      check(not self.force_balance, 'model.router.force_balance',
            'a balanced top-k assignment has no meaning with threshold routing (a variable number of experts)')
      check(isinstance(self.threshold_max_k, int) and self.top_k <= self.max_experts <= self.num_routed,
            'model.router.threshold_max_k',
            f'{self.threshold_max_k} must be 0 or between model.top_k and model.num_experts')
    check(isinstance(self.n_group, int) and self.n_group >= 1 and self.num_routed % self.n_group == 0,
          'model.router.n_group', f'{self.n_group} must be >= 1 and divide the {self.num_routed} routed experts')
    if self.n_group > 1:
      check(not self.num_zero_experts, 'model.router.n_group', 'group-limited routing with zero-computation experts')
      check(isinstance(self.topk_group, int) and 1 <= self.topk_group <= self.n_group, 'model.router.topk_group',
            f'{self.topk_group} must be between 1 and model.router.n_group ({self.n_group})')
      check(self.top_k <= self.topk_group * self.num_routed // self.n_group, 'model.top_k',
            f'{self.top_k} experts do not fit in {self.topk_group} groups of {self.num_routed // self.n_group}')
    if self.num_zero_experts:
      check(0 < self.target_active_experts <= self.top_k, 'model.router.target_active_experts',
            f'{self.target_active_experts} must be in (0, model.top_k={self.top_k}] with '
            'zero-computation experts')
      check(not self.bias_center, 'model.router.bias_center',
            'centring the bias update would cancel the steering towards target_active_experts')

  @property
  def num_routed(self) -> int:
    """Routing pool: real + zero-computation experts."""
    return self.num_experts + self.num_zero_experts

  @property
  def max_experts(self) -> int:
    """Experts a token may use: top_k, or with threshold routing threshold_max_k (0: 2 * top_k)."""
    if self.routing != 'threshold':
      return self.top_k
    return self.threshold_max_k or min(2 * self.top_k, self.num_routed)

  @property
  def needs_bias_target(self) -> bool:
    """Whether the bias update reads this step's scores (not only its loads)."""
    return self.balancer == 'quantile' or self.routing == 'threshold'

  @classmethod
  def from_config(cls, m) -> 'RouterConfig':
    return cls(num_experts=m.num_experts, top_k=m.top_k, bias_update_rate=m.bias_update_rate,
               balance_scope=m.loss.balance_scope, **m.router)


@dataclass(frozen=True)
class Routing:
  expert_TK: jax.Array     # int32 chosen experts; ids >= num_experts are zero-computation experts
                           # (threshold routing: slots no expert passed hold num_routed, weight 0)
  weight_TK: jax.Array     # float32 combine weights
  load_E: jax.Array        # float32 assignments per expert (real then zero experts)
  balance_loss: jax.Array
  z_loss: jax.Array
  scores_TE: jax.Array     # float32 scores and scores + bias, kept for the diagnostics (`routing_stats`)
  selection_TE: jax.Array


def balance_loss(chosen_TE, scores_TE, K: int, group_size: int):
  """sum_i f_i P_i averaged over groups of `group_size` tokens (a sequence, or the global batch).

  f_i = E / (K * group_size) * (tokens of the group routed to i); P_i = mean over the group of
  s_i / sum_j s_j. Equals 1 for perfectly uniform routing."""
  E = scores_TE.shape[-1]
  chosen_GSE = chosen_TE.reshape(-1, group_size, E)
  probs_GSE = (scores_TE / scores_TE.sum(-1, keepdims=True)).reshape(-1, group_size, E)
  f_GE = chosen_GSE.sum(1) * (E / (K * group_size))
  return jnp.mean(jnp.sum(f_GE * probs_GSE.mean(1), axis=-1))


def router_stats(scores_TE, selection_TE, expert_TK, num_real: int) -> dict:
  """Entropy of the normalised scores, selection-score margins, real experts per token."""
  K = expert_TK.shape[-1]
  probs_TE = scores_TE / scores_TE.sum(-1, keepdims=True)
  entropy = -jnp.mean(jnp.sum(probs_TE * jnp.log(probs_TE + 1e-20), axis=-1))
  top_TK1 = jax.lax.top_k(selection_TE, min(K + 1, selection_TE.shape[-1]))[0]
  real_T = jnp.sum(expert_TK < num_real, axis=-1).astype(jnp.float32)
  stats = {'entropy': entropy, 'top1_margin': jnp.mean(top_TK1[:, 0] - top_TK1[:, 1]),
           'active_experts_per_token': jnp.mean(real_T),
           # fraction of tokens using 0..K real experts (differs from "all K" only with zero experts)
           'real_experts_hist': jnp.bincount(real_T.astype(jnp.int32), length=K + 1) / real_T.shape[0]}
  if top_TK1.shape[-1] > K:   # how far the k-th choice is from being replaced by the (k+1)-th
    stats['topk_margin'] = jnp.mean(top_TK1[:, K - 1] - top_TK1[:, K])
  return stats


def router_scores(x_TD, router_DE, bias_E, cfg: RouterConfig):
  """(logits_TE, scores_TE, selection_TE = scores + the selection-only bias), float32."""
  logits_TE = jnp.einsum('td,de->te', x_TD.astype(jnp.float32), router_DE.astype(jnp.float32))
  if cfg.score == 'sigmoid':
    scores_TE = jax.nn.sigmoid(logits_TE)
  else:
    scores_TE = jax.nn.softmax(logits_TE, axis=-1)
  return logits_TE, scores_TE, scores_TE + jax.lax.stop_gradient(bias_E)


def limit_groups(selection_TE, cfg: RouterConfig):
  """Group-limited routing (DeepSeek-V2 `group_limited_greedy`, V3 `noaux_tc`): the experts form
  n_group contiguous groups; a token picks only among the topk_group groups with the best score
  (the sum of a group's top-2 selection scores, or its best one), the rest masked to -inf."""
  if cfg.n_group <= 1:
    return selection_TE
  T, E = selection_TE.shape
  s_TGE = selection_TE.reshape(T, cfg.n_group, E // cfg.n_group)
  group_TG = jax.lax.top_k(s_TGE, 2)[0].sum(-1) if cfg.group_score == 'top2_sum' else s_TGE.max(-1)
  _, best_TK = jax.lax.top_k(group_TG, cfg.topk_group)
  keep_TG = jax.nn.one_hot(best_TK, cfg.n_group, dtype=jnp.bool_).any(1)
  return jnp.where(keep_TG[:, :, None], s_TGE, -jnp.inf).reshape(T, E)


def balanced_experts(T: int, K: int, E: int):
  """A balanced assignment in place of the router's choice (MaxText `use_random_routing`, Megatron
  `moe_router_force_load_balancing`): assignment a = t*K + k of a fixed shuffle of the tokens goes to
  expert a mod E, so each expert gets T*K/E assignments (+-1) and a token's K experts differ (K <= E).
  The combine weights stay the router's scores of those experts, so the router still gets gradients."""
  perm_T = jax.random.permutation(jax.random.key(0), T)
  return ((perm_T[:, None] * K + jnp.arange(K)) % E).astype(jnp.int32)


def route(x_TD, router_DE, bias_E, cfg: RouterConfig, seq_len: int) -> Routing:
  """Top-k routing in float32. `seq_len` groups tokens into sequences for the sequence-wise loss."""
  K = cfg.top_k
  logits_TE, scores_TE, selection_TE = router_scores(x_TD, router_DE, bias_E, cfg)
  top_TK, expert_TK = jax.lax.top_k(limit_groups(selection_TE, cfg), cfg.max_experts)
  if cfg.force_balance:
    expert_TK = balanced_experts(x_TD.shape[0], K, scores_TE.shape[-1])
  weight_TK = jnp.take_along_axis(scores_TE, expert_TK, axis=-1)
  if cfg.routing == 'threshold':   # every expert whose score passes its threshold (bias = -threshold)
    passed_TK = top_TK > 0
    weight_TK = jnp.where(passed_TK, weight_TK, 0.0)
    expert_TK = jnp.where(passed_TK, expert_TK, cfg.num_routed)   # not dispatched, no load
  if cfg.norm_topk:
    weight_TK = weight_TK / (weight_TK.sum(-1, keepdims=True) + 1e-20)
  weight_TK = weight_TK * cfg.routed_scaling

  chosen_TE = jax.nn.one_hot(expert_TK, scores_TE.shape[-1], dtype=jnp.float32).sum(1)
  group = seq_len if cfg.balance_scope == 'sequence' else x_TD.shape[0]
  return Routing(
      expert_TK=expert_TK.astype(jnp.int32), weight_TK=weight_TK, load_E=chosen_TE.sum(0),
      balance_loss=balance_loss(chosen_TE, scores_TE, K, group),
      z_loss=jnp.mean(jax.nn.logsumexp(logits_TE, axis=-1) ** 2),
      scores_TE=scores_TE, selection_TE=selection_TE)


def routing_stats(routing: Routing, cfg: RouterConfig) -> dict:
  """Router diagnostics of a routing already computed (log steps only; see router_stats)."""
  return router_stats(routing.scores_TE, routing.selection_TE, routing.expert_TK, cfg.num_experts)


def stats(x_TD, router_DE, bias_E, cfg: RouterConfig) -> dict:
  """Router diagnostics of one layer's tokens, routing them first."""
  return routing_stats(route(x_TD, router_DE, bias_E, cfg, seq_len=x_TD.shape[0]), cfg)


def bias_target(routing: Routing, bias_E, cfg: RouterConfig):
  """What the score-reading updates move this layer's bias towards (moejax.balancers)."""
  if cfg.routing == 'threshold':
    return balancers.threshold_bias_target(routing.scores_TE, cfg.top_k)
  target_E = target_load(routing.load_E[None], cfg.num_experts, cfg.target_active_experts or cfg.top_k,
                         cfg.top_k)[0]
  new_E = balancers.quantile_bias_target(routing.selection_TE, bias_E, target_E, cfg.top_k)
  return jnp.where(jnp.arange(cfg.num_routed) < cfg.num_experts, new_E, bias_E)   # zero experts fixed


def update_state(router_state: dict, moe_aux, cfg: RouterConfig, step, total_steps: int) -> dict:
  """The train step's router update: {'router_bias'[, 'router_momentum']} after this step.
  `moe_aux` carries the layers' loads (and, for quantile and threshold, their bias targets)."""
  bias_LE = router_state['router_bias']
  if cfg.routing == 'threshold':
    return {'router_bias': balancers.smoothed(bias_LE, moe_aux.bias_target, cfg.threshold_ema, step)}
  if cfg.balancer == 'quantile':
    return {'router_bias': balancers.smoothed(bias_LE, moe_aux.bias_target, cfg.quantile_ema, step)}
  if cfg.balancer == 'smebu':
    target_LE = target_load(moe_aux.load_E, cfg.num_experts, cfg.top_k, cfg.top_k)
    bias, momentum = balancers.smebu_update(
        bias_LE, router_state['router_momentum'], moe_aux.load_E, target_LE, bias_rate(cfg, step, total_steps),
        cfg.smebu_kappa, cfg.smebu_momentum, cfg.num_experts)
    return {'router_bias': bias, 'router_momentum': momentum}
  return {'router_bias': update_bias(bias_LE, moe_aux.load_E, cfg, step, total_steps)}


def target_load(load_LE, num_real: int, target_active: float | None, top_k: int):
  """Per-expert target load: uniform, or with zero experts `target_active` real experts per token."""
  tokens_L1 = load_LE.sum(-1, keepdims=True) / top_k
  E = load_LE.shape[-1]
  if num_real == E:
    return jnp.broadcast_to(load_LE.mean(-1, keepdims=True), load_LE.shape)
  real_E = jnp.arange(E) < num_real
  return jnp.where(real_E, tokens_L1 * target_active / num_real,
                   tokens_L1 * (top_k - target_active) / (E - num_real))


def update_router_bias(bias_LE, load_LE, rate, *, num_real: int | None = None,
                       target_active: float | None = None, mode: str = 'sign',
                       center: bool = False, top_k: int = 1):
  """One auxiliary-loss-free step from loads counted over the global batch (see module doc)."""
  num_real = load_LE.shape[-1] if num_real is None else num_real
  error_LE = target_load(load_LE, num_real, target_active, top_k) - load_LE
  if mode == 'sign':
    delta_LE = rate * jnp.sign(error_LE)
  else:
    delta_LE = rate * error_LE / load_LE.sum(-1, keepdims=True)
  real_E = jnp.arange(load_LE.shape[-1]) < num_real
  delta_LE = jnp.where(real_E, delta_LE, 0.0)     # zero experts' biases stay fixed (LongCat)
  if center:
    delta_LE = delta_LE - delta_LE.mean(-1, keepdims=True)
  return bias_LE + delta_LE


def update_bias(bias_LE, load_LE, cfg: RouterConfig, step, total_steps: int):
  """The train step's bias update: the configured rate, schedule, mode, centring and target."""
  return update_router_bias(bias_LE, load_LE, bias_rate(cfg, step, total_steps), num_real=cfg.num_experts,
                            target_active=cfg.target_active_experts or cfg.top_k,
                            mode=cfg.bias_update_mode, center=cfg.bias_center, top_k=cfg.top_k)


def bias_rate(cfg: RouterConfig, step, total_steps: int):
  """The bias update rate at `step`: constant, or decaying linearly to rate * bias_update_final."""
  if cfg.bias_update_schedule == 'constant':
    return cfg.bias_update_rate
  frac = jnp.minimum(step / max(total_steps, 1), 1.0)
  return cfg.bias_update_rate * (1.0 - (1.0 - cfg.bias_update_final) * frac)
