"""Optimizers by name from `config.optim`: an optax chain with clipping and a logged schedule."""
import jax
import optax


def warmup_cosine(o, total_steps: int):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
      decay_steps=max(o.decay_steps or total_steps, o.warmup_steps + 1), end_value=o.lr * o.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices and expert stacks only (not on norms or vectors)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _router_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'router' in jax.tree_util.keystr(path), params)


def adamw(o, schedule):
  return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     mask=_decay_mask)


def sgd(o, schedule):
  return optax.sgd(schedule, momentum=o.b1)


OPTIMIZERS = {'adamw': adamw, 'sgd': sgd}


def make_optimizer(o, total_steps: int):
  """Returns (optax transform, schedule). The schedule is evaluated for the `lr` metric."""
  schedule = warmup_cosine(o, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      OPTIMIZERS[o.name](o, schedule),
      # A slower router: Adam moves every router weight by ~lr per step, which at small-model
      # learning rates shifts router logits faster than bias balancing can follow.
      optax.masked(optax.scale(o.router_lr_scale), _router_mask))
  return tx, schedule
