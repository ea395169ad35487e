"""Optimizer groups (moejax.optim): rules put every parameter in one group, transforms by name,
Muon per expert against a per-matrix reference, schedules, tiny eps, sharded and resumable state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import configs, model, optim
from moejax.params import logical_axes
from moejax.validate import ConfigError
from conftest import numpy_init_params, tiny_model_config
from runs import BASE_FLAGS, losses_by_step, train

NO_CLIP = 1e9


def tiny_setup(**group_overrides):
  o = configs.base_config().optim
  o.clip_norm = NO_CLIP
  for dotted, v in group_overrides.items():
    g, field = dotted.split('__')
    o.groups[g][field] = v
  specs = model.model_specs(tiny_model_config())
  return o, specs, logical_axes(specs)


def random_like(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)


def first_update(o, specs, axes, seed=0):
  tx, _ = optim.make_optimizer(o, 100, axes)
  params = numpy_init_params(specs, seed)
  grads = random_like(params, seed + 1)
  updates, state = tx.update(grads, tx.init(params), params)
  return params, grads, updates, state


def test_default_groups_cover_every_parameter_exactly_once():
  o, specs, axes = tiny_setup()
  labels = optim.group_labels(o, axes)
  flat = {optim.path_str(p): lab for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0]}
  assert flat['embed'] == flat['head'] == 'embed'
  assert flat['moe_blocks/ffn/router'] == 'router'
  assert flat['moe_blocks/ffn/w_gate'] == flat['dense_blocks/attn/wq'] == 'hidden'
  assert flat['final_norm'] == flat['moe_blocks/attn_norm'] == 'vectors'
  assert set(flat.values()) == {'embed', 'hidden', 'router', 'vectors'}


def test_parameter_in_two_groups_is_a_config_error_naming_both():
  o, _, axes = tiny_setup(router__match='*/router, head')
  with pytest.raises(ConfigError, match=r'^optim.groups: parameter head .* groups embed, router'):
    optim.group_labels(o, axes)


def test_parameter_in_no_group_is_a_config_error_naming_it():
  o, _, axes = tiny_setup(vectors__match='final_norm')
  with pytest.raises(ConfigError, match=r'parameter .*attn_norm.* matches no group'):
    optim.group_labels(o, axes)


@pytest.mark.parametrize('field,value,message', [
    ('name', 'no_such_opt', r"^optim.groups.hidden.name: unknown optax transform 'no_such_opt'"),
    ('name', 'contrib.nope', r"^optim.groups.hidden.name: unknown optax transform"),
    ('name', 'tree_map', r"^optim.groups.hidden.name: unknown optax transform"),
    ('kwargs', 'bogus=1', r"^optim.groups.hidden.kwargs: adamw takes no argument 'bogus'"),
    ('kwargs', 'nesterov=', r'^optim.groups.hidden.kwargs: cannot parse'),
    ('schedule', 'cosin', r"^optim.groups.hidden.schedule: unknown schedule 'cosin'"),
    ('match', 'a & (b', r'^optim.groups.hidden.match: cannot parse rule term'),
])
def test_bad_group_value_is_a_config_error_naming_the_field(field, value, message):
  o, _, axes = tiny_setup(**{f'hidden__{field}': value})
  with pytest.raises(ConfigError, match=message):
    optim.validate_optim(o, axes, 100)


@pytest.mark.parametrize('lr', [0.0, -1e-3])
def test_group_lr_must_be_positive_or_none(lr):
  o, _, axes = tiny_setup(hidden__lr=lr)
  with pytest.raises(ConfigError, match=r'^optim.groups.hidden.lr: must be positive'):
    optim.validate_optim(o, axes, 100)


def test_group_settings_left_none_inherit_the_optim_wide_ones_and_set_values_win():
  o, specs, axes = tiny_setup(hidden__weight_decay=0.0, router__schedule='constant')
  for g in o.groups:   # the base config leaves every group's inheritable setting unset
    assert o.groups[g].name is None and o.groups[g].lr is None
  assert o.groups.embed.schedule is None and o.groups.embed.weight_decay is None
  assert optim.inherit(None, 'adamw') == 'adamw'
  assert optim.inherit(0.0, 0.1) == 0.0          # a falsy value is still the group's own
  o.name, o.lr = 'lion', 1e-3
  rows = optim.group_table(o, axes, numpy_init_params(specs, 0)).splitlines()[1:]
  table = {r.split()[0]: r.split() for r in rows}
  assert all(row[1] == 'lion' and float(row[2]) == pytest.approx(1e-3) for row in table.values()), table
  assert optim.group_spec(o, 'hidden', 100)[4] == 0.0 and optim.group_spec(o, 'embed', 100)[4] == o.weight_decay
  router, embed = optim.group_spec(o, 'router', 100)[3], optim.group_spec(o, 'embed', 100)[3]
  assert float(router(90)) == pytest.approx(float(router(30))) == pytest.approx(1e-3)   # its own: constant
  assert float(embed(90)) < 0.5 * float(embed(30))                                     # optim's: cosine


@pytest.mark.parametrize('name', ['lion', 'sgd', 'adafactor', 'contrib.muon', 'contrib.schedule_free_adamw'])
def test_any_optax_transform_by_name_gives_finite_updates(name):
  o, specs, axes = tiny_setup(hidden__name=name)
  optim.validate_optim(o, axes, 100)
  _, _, updates, _ = first_update(o, specs, axes)
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))


def test_muon_expert_update_equals_muon_on_each_expert_matrix_and_is_orthogonal():
  o, specs, axes = tiny_setup(hidden__name='contrib.muon', hidden__lr=1.0, hidden__weight_decay=0.0)
  o.warmup_steps = 0
  o.schedule = 'constant'
  _, grads, updates, _ = first_update(o, specs, axes)
  u_LEDF = updates['moe_blocks']['ffn']['w_gate']
  g_LEDF = grads['moe_blocks']['ffn']['w_gate']
  ref_tx = optax.contrib.muon(1.0)       # the 2-D default: reduction dim 0, output dim 1
  for l in range(u_LEDF.shape[0]):
    for e in range(u_LEDF.shape[1]):
      g_DF = g_LEDF[l, e]
      ref_DF, _ = ref_tx.update({'w': g_DF}, ref_tx.init({'w': g_DF}), {'w': g_DF})
      np.testing.assert_allclose(u_LEDF[l, e], ref_DF['w'], atol=1e-5, err_msg=f'layer {l} expert {e}')
      # Newton-Schulz with Muon's coefficients puts singular values in roughly [0.7, 1.2] x scale.
      sv = np.linalg.svd(np.asarray(u_LEDF[l, e]), compute_uv=False)
      assert sv.max() / sv.min() < 2.0, (l, e, sv)
  # wo [L, H, N, D] is one (H*N) x D matrix per layer: reduction (H, N), output D.
  dims = optim.muon_dims(axes['dense_blocks']['attn']['wo'])
  assert dims == optax.contrib.MuonDimensionNumbers((1, 2), (3,))
  assert optim.muon_dims(axes['moe_blocks']['ffn']['w_down']) == optax.contrib.MuonDimensionNumbers((2,), (3,))


def test_adamw_groups_reproduce_a_plain_adamw_with_a_router_multiplier():
  o, specs, axes = tiny_setup(router__multiplier=0.1)
  o.schedule, o.warmup_steps = 'constant', 0
  params, grads, updates, _ = first_update(o, specs, axes)
  ref = optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  ref_u, _ = ref.update(grads, ref.init(params), params)
  np.testing.assert_allclose(updates['head'], ref_u['head'], rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(updates['dense_blocks']['attn']['wq'], ref_u['dense_blocks']['attn']['wq'],
                             rtol=1e-6, atol=1e-9)
  # Norm scales are not decayed; the router runs at a tenth of the learning rate (decay included).
  norm_ref = optax.adam(o.lr, b1=o.b1, b2=o.b2, eps=o.eps)
  n_u, _ = norm_ref.update(grads['final_norm'], norm_ref.init(params['final_norm']))
  np.testing.assert_allclose(updates['final_norm'], n_u, rtol=1e-6)
  np.testing.assert_allclose(updates['moe_blocks']['ffn']['router'],
                             0.1 * ref_u['moe_blocks']['ffn']['router'], rtol=1e-5, atol=1e-10)


def test_learning_rates_are_in_the_state_per_group():
  o, specs, axes = tiny_setup(hidden__lr=0.02, router__multiplier=0.5)
  o.schedule, o.warmup_steps = 'constant', 0
  *_, state = first_update(o, specs, axes)
  lrs = {k: float(v) for k, v in optim.learning_rates(state).items()}
  assert lrs == pytest.approx({'lr/hidden': 0.02, 'lr/embed': 3e-3, 'lr/router': 1.5e-3, 'lr/vectors': 3e-3})


@pytest.mark.parametrize('kind,expected', [
    # warmup 10, total 100, peak 1, end 0.1
    ('cosine', {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.55, 100: 0.1}),
    ('linear', {0: 0.0, 10: 1.0, 55: 0.55, 100: 0.1}),
    ('constant', {0: 0.0, 10: 1.0, 100: 1.0}),
    ('wsd', {0: 0.0, 10: 1.0, 80: 1.0, 91: 0.55, 100: 0.1}),   # decays over the last 20% of 90
])
def test_schedule_values_at_landmarks(kind, expected):
  o = configs.base_config().optim
  o.warmup_steps, o.decay_steps, o.min_lr_ratio, o.decay_frac = 10, 100, 0.1, 0.2
  sched = optim.make_schedule(kind, 1.0, o, 100, 'optim.schedule')
  got = {s: float(sched(s)) for s in expected}
  assert got == pytest.approx(expected, abs=1e-6)


def test_tiny_adam_eps_gives_finite_updates_even_for_zero_gradients():
  o, specs, axes = tiny_setup()
  o.eps = 1e-16
  tx, _ = optim.make_optimizer(o, 100, axes)
  params = numpy_init_params(specs, 0)
  state = tx.init(params)
  for step in range(3):
    grads = jax.tree.map(jnp.zeros_like, params) if step == 0 else random_like(params, step)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))


def test_muon_state_is_sharded_like_params_over_the_expert_axis(tmp_path):
  from moejax.state import setup
  from test_config import smoke_config
  c = smoke_config()
  c.optim.groups.hidden.name = 'contrib.muon'
  c.mesh.data, c.mesh.expert = 4, 2
  s = setup(c)
  param_spec = s.state_shardings['params']['moe_blocks']['ffn']['w_gate'].spec
  assert 'expert' in str(param_spec)
  found = [(p, sh) for p, sh in jax.tree_util.tree_flatten_with_path(s.state_shardings['opt_state'])[0]
           if optim.path_str(p).endswith('moe_blocks/ffn/w_gate')]
  assert found, 'no optimizer state mirrors moe_blocks/ffn/w_gate'
  for p, sh in found:
    assert sh.spec == param_spec, (p, sh.spec)


def test_hybrid_pattern_optimizer_state_is_sharded_like_its_list_of_param_stacks():
  """A per-layer attention pattern stores blocks as a list of stacks; their optimizer state must
  still find its parameter's sharding (list indices are part of the path)."""
  from moejax.state import setup
  from test_config import smoke_config
  c = smoke_config()
  c.model.attention = 'swa,mla'
  c.mesh.data, c.mesh.expert = 4, 2
  s = setup(c)
  for j in (0, 1):
    param_spec = s.state_shardings['params']['moe_blocks'][j]['ffn']['w_gate'].spec
    assert 'expert' in str(param_spec)
    found = [sh for p, sh in jax.tree_util.tree_flatten_with_path(s.state_shardings['opt_state'])[0]
             if optim.path_str(p).endswith(f'moe_blocks/{j}/ffn/w_gate')]
    assert len(found) >= 2, found   # AdamW's mu and nu
    assert all(sh.spec == param_spec for sh in found)


@pytest.mark.slow
def test_muon_run_resumes_exactly_on_an_expert_sharded_mesh(tmp_path):
  flags = [*BASE_FLAGS[:2], '--config.mesh.data=4', '--config.mesh.expert=2',
           '--config.optim.groups.hidden.name=contrib.muon', '--config.optim.groups.hidden.lr=0.02']
  train(tmp_path / 'a', *flags, '--config.train.steps=6')
  train(tmp_path / 'b', *flags, '--config.train.steps=4')
  out = train(tmp_path / 'b', *flags, '--config.train.steps=6')
  assert 'resumed from step 4' in out
  a, b = losses_by_step(tmp_path / 'a'), losses_by_step(tmp_path / 'b')
  for step in (5, 6):
    np.testing.assert_allclose(b[step], a[step], rtol=1e-6, err_msg=f'step {step}')
