"""Optimizers as data: parameter groups chosen by rules, each with its own optax transform.

`config.optim.groups.<group>` declares a group: `match`, a rule over parameter paths and logical
axes; `name`, any `optax.*` or `optax.contrib.*` constructor (`adamw`, `lion`, `contrib.muon`, ...;
None = `optim.name`); `kwargs` for it ('nesterov=True, ns_steps=6'); its own `lr`, `schedule`,
`multiplier`, and decoupled `weight_decay` applied where `decay_mask` matches. Every parameter falls
in exactly one group. The chain is global-norm clipping followed by `optax.partition` over the
groups, each group wrapped in `optax.inject_hyperparams` so its learning rate lives in the
optimizer state and is logged as `lr/<group>`.

Rules: comma-separated alternatives (OR) of '&'-joined terms (AND); a term is a glob over the
'/'-joined path ('moe_blocks/ffn/w_gate'), `matrix` (two or more dims besides 'layers' and
'expert'), `ndim>=N`, `axis=NAME` (has that logical axis), each optionally negated with '!'.

Muon: each leaf gets explicit `MuonDimensionNumbers` from its logical axes. 'layers' and 'expert'
are batch dims, so each expert of each layer is orthogonalized on its own. The input (reduction)
dims are the first matrix dim, or every dim but the last when the last is 'embed' (output
projections such as wo [H, N, D]); the rest are output dims. Heads are therefore part of the matrix
(wq [D, H, N] is one D x H*N matrix), as in Muon on fused projections, not orthogonalized per head.
"""
import ast
import fnmatch
import functools
import inspect
import re

import jax
import jax.numpy as jnp
import optax

from moejax.errors import ConfigError

STACK_AXES = ('layers', 'expert')
SCHEDULE_NAMES = ('cosine', 'wsd', 'constant', 'linear')


def _fail(field: str, problem: str):
  raise ConfigError(f'{field}: {problem}')


def path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


# --- rules ---

def _term(term: str, field: str):
  neg = term.startswith('!')
  t = term[1:].strip() if neg else term
  if t == 'matrix':
    fn = lambda path, axes: sum(a not in STACK_AXES for a in axes) >= 2
  elif m := re.fullmatch(r'ndim\s*>=\s*(\d+)', t):
    n = int(m.group(1))
    fn = lambda path, axes: len(axes) >= n
  elif t.startswith('axis='):
    name = t[len('axis='):]
    fn = lambda path, axes: name in axes
  elif t and re.fullmatch(r'[\w/*?\[\]!.-]+', t):
    fn = lambda path, axes: fnmatch.fnmatchcase(path, t)
  else:
    _fail(field, f'cannot parse rule term {term!r} (glob, matrix, ndim>=N, axis=NAME, ! to negate)')
  return (lambda path, axes: not fn(path, axes)) if neg else fn


def parse_rule(rule: str, field: str):
  """'a & b, c' -> predicate(path, axes) = (a and b) or c."""
  alts = [[_term(t.strip(), field) for t in alt.split('&')] for alt in rule.split(',') if alt.strip()]
  if not alts:
    _fail(field, 'empty rule matches nothing')
  return lambda path, axes: any(all(t(path, axes) for t in alt) for alt in alts)


def group_labels(o, axes_tree):
  """The group of every parameter (a tree of names); fails naming a leaf in no group or in two."""
  rules = {g: parse_rule(o.groups[g].match, f'optim.groups.{g}.match') for g in o.groups}

  def label(path, axes):
    p = path_str(path)
    hits = [g for g, r in rules.items() if r(p, axes)]
    if len(hits) != 1:
      _fail('optim.groups', f'parameter {p} {axes} matches {"no group" if not hits else "groups " + ", ".join(hits)}; '
            'every parameter must match exactly one group')
    return hits[0]
  return jax.tree_util.tree_map_with_path(label, axes_tree, is_leaf=is_axes)


# --- transforms by name ---

def resolve_transform(name: str, field: str):
  """'adamw' -> optax.adamw, 'contrib.muon' -> optax.contrib.muon."""
  obj = optax
  for part in name.split('.') if name else ['']:
    obj = getattr(obj, part, None) if part and not part.startswith('_') else None
    if obj is None:
      break
  if obj is None or not callable(obj) or 'learning_rate' not in _params(obj):
    _fail(field, f'unknown optax transform {name!r}; use a constructor taking learning_rate, '
          'e.g. adamw, lion, sgd, adafactor, contrib.muon, contrib.schedule_free_adamw')
  return obj


def _params(fn) -> dict:
  try:
    return dict(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return {}


def parse_kwargs(text: str, field: str) -> dict:
  """'a=1, b=(2, 3), c=True' -> {'a': 1, 'b': (2, 3), 'c': True} (Python literals only)."""
  if not text.strip():
    return {}
  try:
    call = ast.parse(f'f({text})', mode='eval').body
    if call.args:
      raise ValueError('positional values')
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  except (SyntaxError, ValueError) as e:
    _fail(field, f'cannot parse {text!r} as name=literal pairs ({e})')


# --- schedules ---

def make_schedule(kind: str, peak: float, o, total_steps: int, field: str):
  warm = o.warmup_steps
  total = max(o.decay_steps or total_steps, warm + 1)
  end = peak * o.min_lr_ratio
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warm, total, end)
  rest = {
      'constant': lambda: optax.constant_schedule(peak),
      'linear': lambda: optax.linear_schedule(peak, end, total - warm),
      # Warmup-stable-decay: constant until the last decay_frac of the run, then linear to `end`.
      'wsd': lambda: optax.join_schedules(
          [optax.constant_schedule(peak),
           optax.linear_schedule(peak, end, max(1, round(o.decay_frac * (total - warm))))],
          [max(0, total - warm - max(1, round(o.decay_frac * (total - warm))))]),
  }
  if kind not in rest:
    _fail(field, f'unknown schedule {kind!r}; choose one of {list(SCHEDULE_NAMES)}')
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), rest[kind]()], [warm])


# --- Muon dimension numbers ---

def muon_dims(axes):
  """MuonDimensionNumbers for one leaf from its logical axes (None: not a matrix)."""
  dims = [i for i, a in enumerate(axes) if a not in STACK_AXES]
  if len(dims) < 2:
    return None
  if axes[dims[-1]] == 'embed':
    reduction, output = dims[:-1], dims[-1:]
  else:
    reduction, output = dims[:1], dims[1:]
  return optax.contrib.MuonDimensionNumbers(tuple(reduction), tuple(output))


# --- assembly ---

def _decoupled_decay(learning_rate, weight_decay: float):
  """u <- u - lr * wd * p (AdamW's decoupled decay, for any transform)."""
  return optax.stateless(lambda u, p: jax.tree.map(lambda u, p: u - learning_rate * weight_decay * p, u, p))


def inherit(group_value, default):
  """A group's own setting, or the optim-wide one where the group leaves it None."""
  return default if group_value is None else group_value


def group_spec(o, g: str, total_steps: int):
  """(transform factory of learning_rate, schedule) for group g, from config with inheritance."""
  c = o.groups[g]
  field = f'optim.groups.{g}'
  name = inherit(c.name, o.name)
  ctor = resolve_transform(name, f'{field}.name' if c.name is not None else 'optim.name')
  params = _params(ctor)
  kwargs = parse_kwargs(c.kwargs, f'{field}.kwargs')
  for k in kwargs:
    if k not in params or k == 'learning_rate':
      _fail(f'{field}.kwargs', f'{name} takes no argument {k!r}')
  defaults = {'b1': o.b1, 'b2': o.b2, 'eps': o.eps, 'weight_decay': 0.0}  # decay is applied below
  kwargs = {**{k: v for k, v in defaults.items() if k in params}, **kwargs}
  peak = inherit(c.lr, o.lr) * c.multiplier
  schedule = make_schedule(inherit(c.schedule, o.schedule), peak, o, total_steps, f'{field}.schedule')
  wd = inherit(c.weight_decay, o.weight_decay)
  decay_rule = parse_rule(c.decay_mask, f'{field}.decay_mask')
  return name, ctor, kwargs, schedule, wd, decay_rule, 'muon_weight_dimension_numbers' in params


def _factory(ctor, kwargs, wd, decay_mask):
  """learning_rate -> transform: the only argument inject_hyperparams sees (and logs)."""
  def factory(learning_rate):
    inner = ctor(learning_rate=learning_rate, **kwargs)
    if wd == 0:
      return inner
    return optax.chain(inner, optax.masked(_decoupled_decay(learning_rate, wd), decay_mask))
  return factory


def make_optimizer(o, total_steps: int, axes_tree):
  """Returns (optax transform, {group: schedule}); `axes_tree` holds every parameter's logical axes."""
  labels = group_labels(o, axes_tree)
  transforms, schedules = {}, {}
  for g in o.groups:
    name, ctor, kwargs, schedule, wd, decay_rule, is_muon = group_spec(o, g, total_steps)
    if is_muon and 'muon_weight_dimension_numbers' not in kwargs:
      dims = jax.tree_util.tree_map_with_path(
          lambda path, axes, lab, g=g: muon_dims(axes) if lab == g else None, axes_tree, labels,
          is_leaf=is_axes)
      kwargs['muon_weight_dimension_numbers'] = lambda _, dims=dims: dims
    decay_mask = jax.tree_util.tree_map_with_path(lambda path, axes: decay_rule(path_str(path), axes),
                                                  axes_tree, is_leaf=is_axes)

    transforms[g] = optax.inject_hyperparams(_factory(ctor, kwargs, wd, decay_mask))(learning_rate=schedule)
    schedules[g] = schedule
  tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), optax.partition(transforms, labels))
  return tx, schedules


def validate_optim(o, axes_tree, total_steps: int):
  """Raises ConfigError naming the field for anything make_optimizer would reject, before compiling."""
  _check = lambda ok, field, msg: ok or _fail(field, msg)
  resolve_transform(o.name, 'optim.name')
  _check(o.schedule in SCHEDULE_NAMES, 'optim.schedule',
         f'unknown schedule {o.schedule!r}; choose one of {list(SCHEDULE_NAMES)}')
  _check(0 < o.decay_frac <= 1, 'optim.decay_frac', f'must be in (0, 1], got {o.decay_frac}')
  _check(len(o.groups) > 0, 'optim.groups', 'needs at least one group')
  for g in o.groups:
    lr = o.groups[g].lr
    _check(lr is None or lr > 0, f'optim.groups.{g}.lr', f'must be positive (or None = optim.lr), got {lr}')
    group_spec(o, g, total_steps)
  tx, _ = make_optimizer(o, total_steps, axes_tree)
  # Constructors check some arguments only when called: surface those as config errors too.
  try:
    jax.eval_shape(tx.init, jax.tree.map(lambda a: jax.ShapeDtypeStruct((2,) * len(a), jnp.float32),
                                         axes_tree, is_leaf=is_axes))
  except (TypeError, ValueError) as e:
    _fail('optim.groups', f'the optimizer cannot be initialised: {str(e).splitlines()[0]}')


def learning_rates(opt_state) -> dict:
  """{'lr/<group>': the learning rate each group used in the step that produced `opt_state`}."""
  partition_state = opt_state[1]
  return {f'lr/{g}': s.inner_state.hyperparams['learning_rate']
          for g, s in partition_state.inner_states.items()}


def group_table(o, axes_tree, shapes_tree) -> str:
  """A printable table: group, transform, lr, number of tensors and parameters."""
  labels = jax.tree.leaves(group_labels(o, axes_tree))
  sizes = [_size(s.shape) for s in jax.tree.leaves(shapes_tree)]
  rows = [f'{"group":<10} {"transform":<22} {"lr":>9} {"tensors":>7} {"params":>10}']
  for g in o.groups:
    c = o.groups[g]
    n = [s for lab, s in zip(labels, sizes) if lab == g]
    rows.append(f'{g:<10} {inherit(c.name, o.name):<22} {inherit(c.lr, o.lr) * c.multiplier:>9.3g} '
                f'{len(n):>7} {sum(n):>10,}')
  return '\n'.join(rows)


def _size(shape) -> int:
  return functools.reduce(lambda a, b: a * b, shape, 1)
