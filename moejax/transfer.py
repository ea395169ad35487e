"""Width transfer of hyper-parameters: muP for Adam (Yang et al. 2021, Tensor Programs V, table 3
and its output-multiplier form, table 8), relative to a base width.

With `model.base_width = B > 0` and width multiplier m = d_model / B, the model at d_model = B is
unchanged and a wider one is parameterised so that the learning rate and init tuned at width B
stay (near) optimal:

  parameter                                     init std            Adam learning rate
  hidden matrices (attention, MLP, experts,     base * m**-0.5      base / m
    router: every block matrix)
  output head                                   base model's        base (the logits are
                                                (d_model**-0.5 at B)  multiplied by 1/m)
  embedding, norm scales                        base                base

'base' is what the config gives at any width (`init_std`, the groups' learning rates). The logit
multiplier 1/m gives the effective head weights W/m an init std ~ 1/width and Adam updates
~ 1/width, muP's output layer. The router is a width -> num_experts matrix like the head, but it is
treated as hidden so its logits keep their scale at init (top-k selection among near-equal scores
would otherwise grow noisier with width).

The rule assumes every hidden dimension grows with d_model by the same factor (heads at fixed
head_dim, dense_ffn_dim, expert_ffn_dim, MLA ranks); head_dim fixed keeps the attention logit scale
1/sqrt(head_dim) right (muP's 1/head_dim only matters when head_dim grows). Learning rates are
scaled through the optimizer groups' multipliers, so a group must hold only hidden matrices or none
(the default groups do). Decoupled weight decay follows each group's learning rate.
"""
import copy

import jax

from moejax import optim

HIDDEN = '*_blocks/* & matrix'   # optim rule: every matrix inside a block (router included)


def enabled(m) -> bool:
  return m.base_width > 0


def width_multiplier(m) -> float:
  """m = d_model / base_width (1 when the rule is off)."""
  return m.d_model / m.base_width if enabled(m) else 1.0


def output_multiplier(m) -> float:
  """Multiplies the output logits: 1/m."""
  return 1.0 / width_multiplier(m)


def _is_hidden():
  return optim.parse_rule(HIDDEN, 'model.base_width')


def init_specs(specs, m):
  """Init scales under the rule: hidden matrices' std times m**-0.5; the head's std kept at the base
  model's (its spec scale is d_model**-0.5, so times m**0.5). Identity when the rule is off."""
  if not enabled(m):
    return specs
  from moejax.params import ParamSpec, is_spec
  mult, hidden = width_multiplier(m), _is_hidden()

  def one(path, s):
    p = optim.path_str(path)
    if hidden(p, s.axes):
      return ParamSpec(s.shape, s.axes, s.init, s.scale * mult ** -0.5)
    if p == 'head':
      return ParamSpec(s.shape, s.axes, s.init, s.scale * mult ** 0.5)
    return s
  return jax.tree_util.tree_map_with_path(one, specs, is_leaf=is_spec)


def optim_config(o, m, axes_tree):
  """`config.optim` with every all-hidden group's lr multiplier times 1/m (the config itself when
  the rule is off). Raises ConfigError naming a group that mixes hidden and other parameters."""
  if not enabled(m):
    return o
  labels = optim.group_labels(o, axes_tree)
  hidden = _is_hidden()
  kinds = {g: set() for g in o.groups}
  flags = jax.tree_util.tree_map_with_path(lambda path, axes: hidden(optim.path_str(path), axes),
                                           axes_tree, is_leaf=optim.is_axes)
  for g, h in zip(jax.tree.leaves(labels), jax.tree.leaves(flags)):
    kinds[g].add(h)
  scaled = copy.deepcopy(o)
  for g, k in kinds.items():
    if k == {True, False}:
      optim._fail(f'optim.groups.{g}', 'mixes block matrices with other parameters; model.base_width '
                  'scales learning rates per group, so split it (block matrices: ' + repr(HIDDEN) + ')')
    if k == {True}:
      scaled.groups[g].multiplier = o.groups[g].multiplier / width_multiplier(m)
  return scaled
