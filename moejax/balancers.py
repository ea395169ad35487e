"""Router controllers beside the sign rule: what sets the selection bias after each step.

Axis letters: T tokens, E routed experts (real + zero-computation), K top-k, L MoE layers.

`model.router.balancer` picks the bias update of token-choice (top-k) routing:
  - 'bias' (the default): the auxiliary-loss-free sign / proportional rule (moejax.router,
    `bias_update_mode`, Wang et al. arXiv 2408.15664).
  - 'quantile': quantile balancing (the dual / quantile form of Megatron-Core's
    `quantile_balancing` and Marin's MoE balancer). Token t picks expert e iff its selection score
    beats the K-th best of the other experts' selection scores, margin_te > 0. Given the other
    biases, moving b_e by -q_e, with q_e the score margin that exactly `target_e` tokens of the batch
    pass, gives e its target load at once. Every expert takes that step together (a Jacobi step),
    optionally smoothed by an EMA (`quantile_ema` = weight kept on the old bias).
  - 'smebu': soft-clamped, momentum-damped, centred bias updates (Arcee Trinity's SMEBU): the
    relative load error goes through tanh(kappa * error) instead of sign(), is centred over the
    experts (no common drift), and drives the bias through a momentum buffer (`smebu_momentum`),
    so the bias stops chattering by +-rate around its fixed point at high expert counts.
`model.router.routing = 'threshold'` is expert-threshold routing (arXiv 2603.11535): each expert
keeps an EMA of the score it would need to take its share K*T/E of a batch (`threshold_ema`); a
token goes to every expert whose score passes that threshold (up to `threshold_max_k`), so the
number of experts per token varies while the average stays near K. The thresholds come only from
past batches, so a token's routing never depends on other tokens of its batch (causal). They live
in the router-bias state as -threshold: selection = score - threshold, passing iff > 0.
"""
import jax
import jax.numpy as jnp


def kth_largest_count(values_TE, count_E):
  """Per column e, the midpoint between its round(count_e)-th and next-largest value: exactly
  round(count_e) entries lie above it (barring ties). count_e is clipped to [1, T - 1]."""
  T = values_TE.shape[0]
  desc_TE = -jnp.sort(-values_TE, axis=0)
  c_E = jnp.clip(jnp.round(count_E).astype(jnp.int32), 1, T - 1)
  cols = jnp.arange(values_TE.shape[1])
  return 0.5 * (desc_TE[c_E - 1, cols] + desc_TE[c_E, cols])


def selection_margins(selection_TE, top_k: int):
  """margin_te = selection_te - (K-th largest selection of the token among the other experts):
  expert e is in the token's top-k iff margin_te > 0."""
  top_TK1 = jax.lax.top_k(selection_TE, top_k + 1)[0]
  kth_T, next_T = top_TK1[:, top_k - 1], top_TK1[:, top_k]
  others_TE = jnp.where(selection_TE >= kth_T[:, None], next_T[:, None], kth_T[:, None])
  return selection_TE - others_TE


def quantile_bias_target(selection_TE, bias_E, target_E, top_k: int):
  """The bias that would give every expert its target load on this batch, each given the others'."""
  margin_TE = selection_margins(selection_TE, top_k)
  return bias_E - kth_largest_count(margin_TE, target_E)


def threshold_bias_target(scores_TE, top_k: int):
  """-threshold_e: minus the score that the expert's share K*T/E of this batch's tokens passes."""
  T, E = scores_TE.shape
  return -kth_largest_count(scores_TE, jnp.full((E,), T * top_k / E, jnp.float32))


def smoothed(old_LE, target_LE, ema: float, step):
  """EMA towards the target (the first step takes the target whole: there is no estimate yet)."""
  keep = jnp.where(step == 0, 0.0, ema)
  return keep * old_LE + (1.0 - keep) * target_LE


def smebu_update(bias_LE, momentum_LE, load_LE, target_LE, rate, kappa: float, beta: float,
                 num_real: int):
  """One SMEBU step -> (bias, momentum). Zero-computation experts' biases stay fixed."""
  real_E = jnp.arange(load_LE.shape[-1]) < num_real
  rel_LE = (target_LE - load_LE) / jnp.maximum(target_LE, 1e-9)
  u_LE = jnp.where(real_E, jnp.tanh(kappa * rel_LE), 0.0)
  u_LE = jnp.where(real_E, u_LE - u_LE.sum(-1, keepdims=True) / num_real, 0.0)
  momentum_LE = beta * momentum_LE + (1.0 - beta) * u_LE
  return bias_LE + rate * momentum_LE, momentum_LE
