"""Multi-token prediction (DeepSeek-V3, arXiv 2412.19437 sec. 2.2): D sequential modules after the
decoder; module k predicts token t+k+1 at position t.

Module k takes the previous depth's hidden state h^{k-1} (k = 1: the decoder's output, before the
final norm) and the shared embedding of token t+k, projects [rms_norm(emb); rms_norm(h)] from 2D to
D (that order is the one of DeepSeek's released weights: `eh_proj` over cat(enorm(emb), hnorm(h))),
runs one block of the last decoder layer's FFN kind and attention (the block code of moejax.model),
and predicts through its own final norm and the shared output head. Its parameters are stacked over
the depths under `params['mtp_blocks']` (leading 'layers' axis). Past the sequence end there is no
token t+k: depth k's loss masks its last k positions (`loss_mask` shifted by k); token 0 stands in for
the missing embeddings, and causal attention keeps every unmasked position from reading them.

The training loss adds lambda x the mean over depths of the modules' cross-entropies (lambda:
`model.mtp.loss_weight` under its schedule). MoE blocks among the modules route with a selection bias
of their own (`mtp_router_bias` [D, E] in the train state), updated after each step by the same
controller as the decoder's, from the modules' own loads; their balance and z-losses are added with
the decoder's fixed weights (`loss.balance_weight`, `loss.z_weight`; an adapting balance coefficient
and the hidden z-loss cover the decoder's layers only). QK-clip covers the modules' attentions too.
Axis letters: B batch, T sequence, D model, V vocab, E routed experts, K depth.
"""
import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from moejax.layers import cross_entropy, dense, rms_norm
from moejax.model_config import MTPConfig
from moejax.params import ParamSpec, stacked


@functools.partial(jax.tree_util.register_dataclass, data_fields=('loss_K', 'moe', 'blocks'),
                   meta_fields=())
@dataclass
class MTPAux:
  loss_K: Any              # each depth's cross-entropy
  moe: Any                 # MoEAux stacked over depths, or None when the modules' blocks are dense
  blocks: Any              # BlockAux stacked over depths


def mtp_specs(cfg, block_specs):
  """The modules' parameters, stacked over depths; `block_specs`: one block of the last layer's kind."""
  D = cfg.d_model
  norm = ParamSpec((D,), ('embed',), init='ones')
  return stacked({'enorm': norm, 'hnorm': norm,
                  'eh_proj': ParamSpec((2 * D, D), (None, 'embed'), scale=cfg.init_std),
                  'block': block_specs, 'final_norm': norm}, cfg.mtp.depth)


def shift_left(x_BT, k: int):
  """x[:, t + k] at position t, zeros past the end (any trailing dims)."""
  return jnp.pad(x_BT[:, k:], [(0, 0), (0, k)] + [(0, 0)] * (x_BT.ndim - 2))


def loss_weight(m: MTPConfig, step, total_steps: int):
  """lambda at `step` under `m.schedule`."""
  if m.schedule == 'constant':
    return m.loss_weight
  frac = jnp.minimum(step / max(total_steps, 1), 1.0)
  if m.schedule == 'linear':
    return m.loss_weight + (m.final_weight - m.loss_weight) * frac
  return jnp.where(frac < m.switch_frac, m.loss_weight, m.final_weight)


def loss_metrics(loss_K) -> dict:
  """'mtp_loss' (the mean over depths) and, with several depths, 'mtp_loss/<k>' for each."""
  out = {'mtp_loss': jnp.mean(loss_K)}
  if loss_K.shape[0] > 1:
    out.update({f'mtp_loss/{k + 1}': loss_K[k] for k in range(loss_K.shape[0])})
  return out


def mtp_losses(params, h_BTD, batch, bias_KE, cfg, embed, run_block, logits):
  """Every depth's cross-entropy and its block's auxiliaries (MTPAux). `params`: in the compute
  dtype; `h_BTD`: the decoder's output before the final norm; `embed(tokens_BT)`: the shared
  embedding; `run_block(x_BTD, p_block, bias_E) -> (x_BTD, MoEAux or None, BlockAux)`;
  `logits(x_BTD, norm_D)`: that norm, then the shared head."""
  p_K, eps = params['mtp_blocks'], cfg.norm_eps
  losses, moe_aux, block_aux = [], [], []
  for k in range(1, cfg.mtp.depth + 1):
    p = jax.tree.map(lambda a: a[k - 1], p_K)
    e_BTD = embed(shift_left(batch['inputs'], k))
    x_BTD = dense(jnp.concatenate([rms_norm(e_BTD, p['enorm'], eps), rms_norm(h_BTD, p['hnorm'], eps)], -1),
                  p['eh_proj'])
    h_BTD, moe, blocks = run_block(x_BTD, p['block'], None if bias_KE is None else bias_KE[k - 1])
    losses.append(cross_entropy(logits(h_BTD, p['final_norm']), shift_left(batch['targets'], k),
                                shift_left(batch['loss_mask'], k)))
    moe_aux.append(moe)
    block_aux.append(blocks)
  stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
  return MTPAux(jnp.stack(losses), None if moe_aux[0] is None else stack(moe_aux), stack(block_aux))
