"""Width transfer (moejax.transfer, muP for Adam): identity at the base width, init scales and group
learning rates by the documented factors, the 1/m logit multiplier, a one-line error for a group that
mixes block matrices with other parameters, and the coordinate check: one Adam step changes the
logits by about as much at every width under the rule, but more and more without it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import configs, model, optim, transfer
from moejax.params import init_params, is_spec, logical_axes
from moejax.validate import ConfigError
from conftest import numpy_init_params, tiny_model_config


def _wide(d_model, base_width, **kw):
  """The tiny model at a width: heads, FFN and expert widths grow with d_model (head_dim fixed)."""
  k = d_model // 32
  return tiny_model_config(d_model=d_model, attn=dict(num_heads=4 * k, num_kv_heads=2 * k), dense_ffn_dim=64 * k,
                           expert_ffn_dim=16 * k, base_width=base_width, **kw)


def _flat(tree, is_leaf=None):
  return {optim.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def test_rule_is_the_identity_at_the_base_width_and_when_off():
  for cfg in (_wide(64, 64), _wide(64, 0)):
    specs = model.model_specs(cfg)
    assert transfer.init_specs(specs, cfg) == specs
    assert transfer.output_multiplier(cfg) == 1.0
    o = configs.base_config().optim
    scaled = transfer.optim_config(o, cfg, logical_axes(specs))
    assert {g: scaled.groups[g].multiplier for g in o.groups} == {g: o.groups[g].multiplier for g in o.groups}


def test_init_scales_hidden_by_m_to_minus_half_and_keep_the_base_head():
  cfg, base = _wide(128, 32), _wide(32, 32)         # m = 4
  got = _flat(transfer.init_specs(model.model_specs(cfg), cfg), is_spec)
  plain = _flat(model.model_specs(cfg), is_spec)
  at_base = _flat(model.model_specs(base), is_spec)
  for p, s in got.items():
    if p.startswith(('dense_blocks', 'moe_blocks')) and sum(a not in ('layers', 'expert') for a in s.axes) >= 2:
      assert s.scale == pytest.approx(plain[p].scale / 2), p                  # block matrices, router too
    elif p == 'head':
      assert s.scale == pytest.approx(at_base[p].scale) == pytest.approx(32 ** -0.5)
    else:
      assert s.scale == plain[p].scale, p                                     # embedding, norms
  assert got['moe_blocks/ffn/router'].scale == pytest.approx(cfg.init_std / 2)
  # The drawn weights have that std (truncated normal at 2 std: 0.8796 of the scale).
  w = init_params({'w': got['moe_blocks/ffn/w_up']}, jax.random.key(0))['w']
  assert float(jnp.std(w)) == pytest.approx(0.8796 * cfg.init_std / 2, rel=0.02)


def test_block_matrix_groups_learn_at_lr_over_m_the_rest_at_lr():
  """First Adam step from zero params (no decay term): each update is -lr * g/|g| = -lr per entry."""
  cfg = _wide(128, 32)
  specs = model.model_specs(cfg)
  o = configs.base_config().optim
  o.schedule, o.warmup_steps, o.lr = 'constant', 0, 1e-2
  tx, schedules = optim.make_optimizer(transfer.optim_config(o, cfg, logical_axes(specs)), 10,
                                       logical_axes(specs))
  assert float(schedules['hidden'](0)) == pytest.approx(1e-2 / 4)
  assert float(schedules['router'](0)) == pytest.approx(1e-2 / 4)
  assert float(schedules['embed'](0)) == float(schedules['vectors'](0)) == pytest.approx(1e-2)
  params = jax.tree.map(jnp.zeros_like, numpy_init_params(specs, 0))
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.float32), params)
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
  labels = _flat(optim.group_labels(o, logical_axes(specs)))
  for p, u in _flat(updates).items():
    lr = 1e-2 / 4 if labels[p] in ('hidden', 'router') else 1e-2
    np.testing.assert_allclose(np.asarray(u), -lr, rtol=1e-4, err_msg=p)


def test_a_group_mixing_block_matrices_and_other_parameters_is_a_config_error():
  cfg = _wide(64, 32)
  o = configs.base_config().optim
  o.groups.embed.match = 'embed, head, */router'
  o.groups.router.match = 'final_norm & !final_norm'   # matches nothing, which optim allows
  with pytest.raises(ConfigError, match=r'^optim\.groups\.embed: mixes block matrices'):
    transfer.optim_config(o, cfg, logical_axes(model.model_specs(cfg)))


def test_logits_are_multiplied_by_base_over_width(single_mesh):
  cfg_on, cfg_off = _wide(64, 32), _wide(64, 0)
  params = numpy_init_params(model.model_specs(cfg_off), 0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 8)), jnp.int32)
  bias = jnp.zeros((2, 8), jnp.float32)
  on, off = jax.jit(lambda p: [model.forward(p, bias, tokens, c, single_mesh)[0] for c in (cfg_on, cfg_off)])(params)
  np.testing.assert_allclose(np.asarray(on), np.asarray(off) / 2, rtol=1e-5, atol=1e-6)


def _logit_change_after_one_step(cfg, mesh, lr=1e-2):
  """RMS change of the logits on a fixed batch after one Adam step (muP's coordinate check)."""
  specs = transfer.init_specs(model.model_specs(cfg), cfg)
  params = numpy_init_params(specs, 0)
  o = configs.base_config().optim
  o.schedule, o.warmup_steps, o.lr, o.clip_norm, o.weight_decay = 'constant', 0, lr, 1e9, 0.0
  tx, _ = optim.make_optimizer(transfer.optim_config(o, cfg, logical_axes(specs)), 10, logical_axes(specs))
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 17)), jnp.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': jnp.ones((4, 16), jnp.float32)}
  bias = jnp.zeros((cfg.num_moe_layers, cfg.num_experts), jnp.float32)

  @jax.jit
  def change(params):
    grads = jax.grad(lambda p: model.loss_fn(p, bias, batch, cfg, mesh)[0])(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    before, _ = model.forward(params, bias, batch['inputs'], cfg, mesh)
    after, _ = model.forward(new, bias, batch['inputs'], cfg, mesh)
    return jnp.sqrt(jnp.mean((after - before) ** 2))
  return float(change(params))


@pytest.mark.slow
def test_coordinate_check_logit_updates_stay_flat_with_width_under_the_rule(single_mesh):
  widths = (32, 128)
  mup = [_logit_change_after_one_step(_wide(w, 32, num_layers=2), single_mesh) for w in widths]
  sp = [_logit_change_after_one_step(_wide(w, 0, num_layers=2), single_mesh) for w in widths]
  assert mup[0] == pytest.approx(sp[0])               # the same model at the base width
  assert 0.5 < mup[1] / mup[0] < 2, mup               # flat under the rule
  assert sp[1] / sp[0] > 2 * mup[1] / mup[0], (sp, mup)   # grows without it
