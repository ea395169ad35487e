"""Tests for multi-token prediction (moejax.mtp): the modules' losses and gradients against a naive
loop over depths, the loss wiring, the weight schedules, QK-clip of the modules' blocks, bad config
values, and a short training run."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_test_mesh, numpy_init_params, tiny_model_config
from reference import ref_moe, ref_rms_norm, ref_softmax, ref_swiglu

from moejax import model, mtp, qk_clip
from moejax.errors import ConfigError
from moejax.model_config import MTPConfig

B, T, DEPTH = 1, 6, 2
TOL = dict(rtol=2e-5, atol=2e-6)


def mtp_cfg(last: str = 'moe', **kw):
  """Two layers (dense, then `last`), two MTP modules; auxiliary losses off unless given."""
  kw.setdefault('loss', dict(balance_weight=0.0, z_weight=0.0))
  kw.setdefault('mtp', dict(depth=DEPTH, loss_weight=0.5))
  return tiny_model_config(num_layers=2, num_dense_layers=1, init_std=0.1, num_experts=4,
                           attn=dict(num_heads=2, num_kv_heads=1, head_dim=8),
                           dense_layers='1' if last == 'dense' else '', **kw)


@functools.lru_cache(maxsize=None)
def _mesh():
  return make_test_mesh({'data': 1, 'expert': 1})


def problem(cfg, seed=0):
  p = numpy_init_params(model.model_specs(cfg), seed)
  rng = np.random.default_rng(seed + 1)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T + 1)), jnp.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'loss_mask': jnp.asarray(rng.uniform(size=(B, T)) > 0.25, jnp.float32)}
  h_BTD = jnp.asarray(rng.standard_normal((B, T, cfg.d_model)), jnp.float32)
  bias_KE = jnp.asarray(0.05 * rng.standard_normal((DEPTH, cfg.router.num_routed)), jnp.float32)
  return p, batch, h_BTD, bias_KE


# ----------------------------------------------------------------------------- naive reference

def ref_block(p, x_TD, cfg, bias_E):
  """One standard block on one sequence (DeepSeek routing: top-k of sigmoid scores + bias)."""
  assert cfg.router.score == 'sigmoid' and cfg.router.n_group == 1
  x_TD = x_TD + ref_softmax(p['attn'], ref_rms_norm(x_TD, p['attn_norm'], cfg.norm_eps)[None],
                            cfg.attn, 'gqa')[0][0]
  h_TD = ref_rms_norm(x_TD, p['ffn_norm'], cfg.norm_eps)
  f = p['ffn']
  if 'router' not in f:
    return x_TD + ref_swiglu(h_TD, f)
  selection_TE = jax.lax.stop_gradient(jax.nn.sigmoid(h_TD @ f['router']) + bias_E)
  chosen_TK = jax.lax.top_k(selection_TE, cfg.top_k)[1]
  y_TD = ref_moe(h_TD, f['router'], f['w_gate'], f['w_up'], f['w_down'], chosen_TK, cfg.router)
  return x_TD + y_TD + ref_swiglu(h_TD, f['shared'])


def ref_mtp_losses(params, h_BTD, batch, bias_KE, cfg):
  """Depth by depth and sequence by sequence on the positions that have a token k ahead (T - k of
  them): [emb(t+k) ; h_t] -> projection -> block -> norm -> head; cross-entropy against token
  t+k+1 where loss_mask[t+k] is set. Returns the depths' losses."""
  eps, losses = cfg.norm_eps, []
  h_prev = [h_BTD[b] for b in range(B)]
  for k in range(1, cfg.mtp.depth + 1):
    p = jax.tree.map(lambda a: a[k - 1], params['mtp_blocks'])
    head = params['embed'].T if cfg.tie_embeddings else params['head']
    num, den, h_next = 0.0, 0.0, []
    for b in range(B):
      n = T - k
      e_ND = params['embed'][batch['inputs'][b, k:]]
      x_ND = jnp.concatenate([ref_rms_norm(e_ND, p['enorm'], eps), ref_rms_norm(h_prev[b][:n], p['hnorm'], eps)],
                             -1) @ p['eh_proj']
      x_ND = ref_block(p['block'], x_ND, cfg, bias_KE[k - 1])
      logp_NV = jax.nn.log_softmax(ref_rms_norm(x_ND, p['final_norm'], eps) @ head, -1)
      nll_N = -logp_NV[jnp.arange(n), batch['targets'][b, k:]]
      num, den = num + jnp.sum(nll_N * batch['loss_mask'][b, k:]), den + jnp.sum(batch['loss_mask'][b, k:])
      h_next.append(x_ND)
    losses.append(num / jnp.maximum(den, 1.0))
    h_prev = h_next
  return jnp.stack(losses)


def lib_mtp_losses(params, h_BTD, batch, bias_KE, cfg):
  return model.mtp_aux(params, h_BTD, batch, bias_KE, cfg, _mesh(), ()).loss_K


# ----------------------------------------------------------------------------- forward and gradient

# the MoE case (~12 s) in the slow run; the dense case runs the same module code
@pytest.mark.parametrize('last', [pytest.param('moe', marks=pytest.mark.slow), 'dense'])
def test_mtp_losses_and_grads_equal_naive_loop_over_depths(last):
  """Every depth's cross-entropy, and the gradients of their weighted mean w.r.t. every parameter
  and the decoder output h, as a per-sequence loop over depths on the truncated sequences."""
  cfg = mtp_cfg(last)
  p, batch, h, bias = problem(cfg)
  weights = jnp.asarray([0.3, 0.7])

  def value_and_grads(losses):   # (weighted sum, each depth's loss), grads w.r.t. (params, h)
    def weighted(p, h):
      loss_K = losses(p, h, batch, bias, cfg)
      return weights @ loss_K, loss_K
    return jax.jit(jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True))(p, h)

  (v_ref, ref_K), (gp_ref, gh_ref) = value_and_grads(ref_mtp_losses)
  (v, loss_K), (gp, gh) = value_and_grads(lib_mtp_losses)
  np.testing.assert_allclose(loss_K, ref_K, **TOL)
  np.testing.assert_allclose(v, v_ref, **TOL)
  np.testing.assert_allclose(gh, gh_ref, **TOL)
  assert float(jnp.abs(gh).max()) > 0
  for (path, g), g_ref in zip(jax.tree_util.tree_flatten_with_path(gp)[0], jax.tree.leaves(gp_ref)):
    np.testing.assert_allclose(g, g_ref, err_msg=jax.tree_util.keystr(path), **TOL)
  assert float(jnp.abs(gp['mtp_blocks']['eh_proj']).max()) > 0 and float(jnp.abs(gp['head']).max()) > 0


def test_depth_k_ignores_the_last_k_positions_and_tokens_past_them():
  """Changing the last target (and so the last input) moves no depth-k loss at masked-out
  positions: only depth k's predictions of in-sequence tokens count."""
  cfg = mtp_cfg('dense')
  p, batch, h, bias = problem(cfg)
  batch['loss_mask'] = jnp.ones((B, T))
  changed = dict(batch, targets=batch['targets'].at[:, -1].set((batch['targets'][:, -1] + 1) % cfg.vocab_size))
  run = jax.jit(lambda b: lib_mtp_losses(p, h, b, bias, cfg))
  # the last target is a depth-k target of position T-1-k: every depth sees it change
  assert np.all(np.asarray(run(batch)) != np.asarray(run(changed)))
  masked = dict(changed, loss_mask=batch['loss_mask'].at[:, -1].set(0.0))
  np.testing.assert_array_equal(run(dict(batch, loss_mask=masked['loss_mask'])), run(masked))


# ----------------------------------------------------------------------------- wiring into the loss

def test_depth_zero_params_and_lm_loss_are_those_of_the_model_without_mtp():
  """MTP adds its own parameters only (the others draw the same values) and leaves the LM loss bit
  for bit; the total is the LM loss plus lambda x the mean of the modules' losses."""
  cfg, cfg0 = mtp_cfg(), mtp_cfg(mtp=dict(depth=0))
  specs, specs0 = model.model_specs(cfg), model.model_specs(cfg0)
  # init_params draws each leaf from a key folded from its path: equal specs, equal values
  assert 'mtp_blocks' not in specs0 and {k: v for k, v in specs.items() if k != 'mtp_blocks'} == specs0
  p, batch, _, bias_KE = problem(cfg)
  p0 = {k: v for k, v in p.items() if k != 'mtp_blocks'}
  bias_LE = jnp.zeros((cfg.num_moe_layers, cfg.router.num_routed))
  run = jax.jit(lambda p, w: model.loss_fn(p, bias_LE, batch, cfg, _mesh(), mtp_weight=w, mtp_bias_KE=bias_KE))
  (loss, aux), (unweighted, _) = run(p, cfg.mtp.loss_weight), run(p, 0.0)
  loss0, aux0 = jax.jit(lambda p: model.loss_fn(p, bias_LE, batch, cfg0, _mesh()))(p0)
  assert aux0.mtp is None
  np.testing.assert_array_equal(unweighted, loss0)
  np.testing.assert_array_equal(aux.lm_loss, loss0)
  h_BTD, _ = jax.jit(lambda p: model.decoder(p, bias_LE, batch['inputs'], cfg, _mesh(), (),
                                             model.block_functions(cfg, _mesh(), ())))(p)
  ref_K = jax.jit(lambda p, h: ref_mtp_losses(p, h, batch, bias_KE, cfg))(p, h_BTD)
  np.testing.assert_allclose(aux.mtp.loss_K, ref_K, **TOL)
  np.testing.assert_allclose(loss, loss0 + cfg.mtp.loss_weight * jnp.mean(ref_K), **TOL)


def test_mtp_moe_blocks_add_their_balance_and_z_losses_with_the_decoder_weights():
  cfg = mtp_cfg(loss=dict(balance_weight=0.01, z_weight=0.001))
  p, batch, _, bias_KE = problem(cfg)
  bias_LE = jnp.zeros((cfg.num_moe_layers, cfg.router.num_routed))
  loss, aux = jax.jit(lambda p: model.loss_fn(p, bias_LE, batch, cfg, _mesh(), mtp_bias_KE=bias_KE))(p)
  main = (aux.lm_loss + 0.01 * aux.moe.balance_loss.mean() + 0.001 * aux.moe.z_loss.mean()
          + cfg.mtp.loss_weight * aux.mtp.loss_K.mean())
  assert aux.mtp.moe.load_E.shape == (DEPTH, cfg.router.num_routed)
  np.testing.assert_allclose(loss, main + 0.01 * aux.mtp.moe.balance_loss.mean()
                             + 0.001 * aux.mtp.moe.z_loss.mean(), rtol=1e-6)
  assert float(aux.mtp.moe.balance_loss.mean()) > 0


@pytest.mark.parametrize('schedule', ['constant', 'linear', 'step'])
def test_loss_weight_follows_its_schedule(schedule):
  m = MTPConfig(depth=1, loss_weight=0.3, schedule=schedule, final_weight=0.1, switch_frac=0.5)
  at = lambda step: float(mtp.loss_weight(m, jnp.asarray(step), 100))
  expected = {'constant': (0.3, 0.3, 0.3, 0.3), 'linear': (0.3, 0.3 - 0.2 * 0.49, 0.2, 0.1),
              'step': (0.3, 0.3, 0.1, 0.1)}[schedule]
  np.testing.assert_allclose([at(0), at(49), at(50), at(100)], expected, rtol=1e-6)


# ----------------------------------------------------------------------------- QK-clip

def test_qk_clip_rescales_only_the_mtp_heads_over_the_threshold():
  cfg = mtp_cfg()
  p, *_ = problem(cfg)
  H = cfg.attn.num_heads
  low_LH = jnp.zeros((cfg.num_layers, H))
  mtp_KH = jnp.zeros((DEPTH, H)).at[1, 1].set(40.0)   # depth 2, head 1: twice tau
  out = qk_clip.qk_clip(p, low_LH, cfg, 20.0, mtp_KH)
  jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in out.items() if k != 'mtp_blocks'},
               {k: v for k, v in p.items() if k != 'mtp_blocks'})
  attn, attn0 = out['mtp_blocks']['block']['attn'], p['mtp_blocks']['block']['attn']
  factor = lambda w, depth, head: float(jnp.mean(attn[w][depth, :, head] / attn0[w][depth, :, head]))
  group = lambda h: h // (H // attn['wk'].shape[2])
  logit_scale = lambda depth, h: factor('wq', depth, h) * factor('wk', depth, group(h))
  np.testing.assert_allclose([logit_scale(1, h) for h in range(H)], [1.0, 0.5], rtol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda a: a[0], out['mtp_blocks']),
               jax.tree.map(lambda a: a[0], p['mtp_blocks']))


# ----------------------------------------------------------------------------- config

BAD = [
    ({'depth': -1}, 'model.mtp.depth'),
    ({'loss_weight': -0.1}, 'model.mtp.loss_weight'),
    ({'final_weight': -1.0}, 'model.mtp.final_weight'),
    ({'schedule': 'cosine'}, 'model.mtp.schedule'),
    ({'switch_frac': 0.0}, 'model.mtp.switch_frac'),
]


@pytest.mark.parametrize('overrides,field', BAD, ids=[f for _, f in BAD])
def test_bad_mtp_value_is_one_line_naming_the_field(overrides, field):
  with pytest.raises(ConfigError) as info:
    tiny_model_config(mtp=overrides)
  msg = str(info.value)
  assert msg.startswith(field + ':') and '\n' not in msg, msg


def test_depth_not_below_seq_len_is_refused_naming_depth():
  from moejax import configs
  from moejax.validate import validate
  c = configs.base_config()
  c.train.seq_len, c.model.mtp.depth = 4, 4
  with pytest.raises(ConfigError) as info:
    validate(c, 8, check_data=False)
  assert str(info.value).startswith('model.mtp.depth:'), str(info.value)


# ----------------------------------------------------------------------------- training

@pytest.mark.slow   # train steps with MTP (~11 s); the naive-reference test checks the losses and gradients
def test_train_steps_with_mtp_report_falling_mtp_losses_and_move_their_router_bias():
  """A few jitted train steps on one batch (tiny model, one device): the step reports mtp_loss, each
  depth's loss and lambda, the modules' loss falls, and their MoE router bias leaves zero."""
  from layouts import FAST_COMPILE
  from moejax import configs
  from moejax.state import setup
  from moejax.train import make_train_step
  from conftest import update_model, TINY_MODEL
  c = configs.base_config()
  update_model(c.model, TINY_MODEL)
  c.model.mtp.depth, c.model.mtp.schedule = 2, 'linear'
  c.mesh.data, c.train.batch_size, c.train.seq_len, c.train.steps = 1, 2, 8, 8
  c.optim.warmup_steps = 0
  s = setup(c, devices=jax.devices()[:1])
  params = numpy_init_params(model.model_specs(s.model), 0)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': jax.jit(s.tx.init)(params),
           **{k: jnp.zeros(a.shape, a.dtype) for k, a in s.abstract_state.items()
              if k in ('router_bias', 'mtp_router_bias')},
           'balance_coef': jnp.zeros(s.abstract_state['balance_coef'].shape, jnp.float32)}
  assert set(state) == set(s.abstract_state)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, c.model.vocab_size, (2, 9)), jnp.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': jnp.ones((2, 8), jnp.float32)}
  step = make_train_step(s, diagnostics=False).lower(state, batch).compile(compiler_options=FAST_COMPILE)
  outs = []
  for _ in range(8):
    state, out = step(state, batch)
    outs.append(jax.device_get(out))
  mtp_losses = [float(o['mtp_loss']) for o in outs]
  np.testing.assert_allclose(mtp_losses, [(o['mtp_loss/1'] + o['mtp_loss/2']) / 2 for o in outs], rtol=1e-6)
  assert mtp_losses[-1] < mtp_losses[0] - 0.5, mtp_losses
  np.testing.assert_allclose([o['mtp_weight'] for o in outs],
                             [0.3 + (0.1 - 0.3) * i / 8 for i in range(8)], rtol=1e-6)
  assert float(jnp.abs(state['mtp_router_bias']).max()) > 0


@pytest.mark.slow   # the CLI end to end (data, eval, checkpoint): ~1-3 min on 2 cores
def test_training_run_with_mtp_logs_falling_mtp_losses_and_saves_their_router_bias(tmp_path):
  """A short smoke run with two modules: mtp_loss (and each depth's) in every train record and
  falling, eval/loss still the LM loss, and the modules' MoE router bias moved from zero."""
  from runs import train, train_records, eval_records
  from moejax import checkpoint
  train(tmp_path, '--config.model.mtp.depth=2', '--config.train.steps=16', '--config.train.log_every=1',
        '--config.train.eval_every=16', '--config.checkpoint.every=16', '--config.mesh.data=8')
  records = train_records(tmp_path)
  assert len(records) == 16
  for key in ('mtp_loss', 'mtp_loss/1', 'mtp_loss/2', 'mtp_weight', 'lm_loss'):
    assert all(np.isfinite(r[key]) for r in records), key
  first, last = (np.mean([r['mtp_loss'] for r in rs]) for rs in (records[:3], records[-3:]))
  assert last < first - 0.1, (first, last)
  np.testing.assert_allclose([r['mtp_loss'] for r in records],
                             [(r['mtp_loss/1'] + r['mtp_loss/2']) / 2 for r in records], rtol=1e-5)
  evals = eval_records(tmp_path)
  assert evals[-1]['step'] == 16 and np.isfinite(evals[-1]['eval/loss'])
  abstract = {'mtp_router_bias': jax.ShapeDtypeStruct((2, 8), jnp.float32,
                                                      sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  state, step = checkpoint.restore_items(str(tmp_path), abstract)
  assert step == 16 and float(jnp.abs(state['mtp_router_bias']).max()) > 0
