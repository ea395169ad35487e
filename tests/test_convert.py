"""moejax.convert on tiny random Hugging Face models (tests/fixtures/hf, made by transformers with
tests/fixtures/hf/make.py): import -> logits within 1e-4 of transformers', export -> every tensor
bit for bit, round trip, a training step from the imported checkpoint, the fused expert layout, and
one-line errors for bad input with nothing written."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moejax.configs import base_config
from moejax.convert import checkpoints, hf_config
from moejax.convert.hf_config import ConvertError
from moejax.model_config import ModelConfig
import runs

FIXTURES = Path(__file__).parent / 'fixtures' / 'hf'
MODELS = sorted(p.name for p in FIXTURES.iterdir() if (p / 'config.json').is_file())
# the ones with the most pieces (dense layers between MoE layers); the others run with `make test-slow`
FAST = ('deepseek_v3', 'qwen2_moe_sparse_step')   # qwen3_moe_mlp_only: imported by the sharded test too
CASES = [pytest.param(m, marks=() if m in FAST else pytest.mark.slow) for m in MODELS]


def tensors(d) -> dict:
  out = {}
  for f in sorted(Path(d).glob('*.safetensors')):
    out.update(load_file(str(f)))
  return out


def test_every_family_has_a_fixture():
  assert set(MODELS) >= {'deepseek_v2', 'deepseek_v3', 'mixtral', 'olmoe', 'qwen2_moe', 'qwen3_moe',
                         'qwen3_moe_mlp_only', 'qwen2_moe_sparse_step', 'deepseek_v2_q_lora_yarn'}


def _hf(name: str, **overrides) -> dict:
  return {**json.loads((FIXTURES / name / 'config.json').read_text()), **overrides}


def _kinds(hf: dict, names=None) -> tuple[str, ...]:
  """The layer kinds of the moejax model an HF config imports as."""
  config = base_config()
  hf_config.apply(config, hf_config.to_moejax(hf, names))
  return ModelConfig.from_config(config.model).layer_kinds


@pytest.mark.parametrize('layers,only,step,kinds', [   # transformers: sparse iff i not in
    (4, [1], 1, 'mdmm'),                                # mlp_only_layers and (i + 1) % step == 0
    (4, [], 2, 'dmdm'),
    (6, [0, 5], 3, 'ddmddd'),
    (3, [], 1, 'mmm'),
])
def test_qwen_mlp_only_layers_and_decoder_sparse_step_make_the_same_layer_kinds(layers, only, step, kinds):
  hf = _hf('qwen3_moe_mlp_only', num_hidden_layers=layers, mlp_only_layers=only, decoder_sparse_step=step)
  assert ''.join(k[0] for k in _kinds(hf)) == kinds
  assert ''.join(k[0] for k in _kinds({**hf, 'model_type': 'qwen2_moe', 'shared_expert_intermediate_size': 16})) == kinds


def test_deepseek_dense_layers_first_k_and_moe_layer_freq():
  hf = _hf('deepseek_v3', num_hidden_layers=5, first_k_dense_replace=2)
  assert _kinds(hf) == ('dense', 'dense', 'moe', 'moe', 'moe')
  # moe_layer_freq: DeepSeek's own code keeps layers with i % freq != 0 dense; transformers ignores it,
  # so the tensors decide (routers on every layer past the first k: transformers' layout)
  freq = {**hf, 'moe_layer_freq': 2}
  assert _kinds(freq) == ('dense', 'dense', 'moe', 'dense', 'moe')
  assert _kinds(freq, {f'model.layers.{i}.mlp.gate.weight' for i in (2, 4)}) == ('dense', 'dense', 'moe', 'dense', 'moe')
  assert _kinds(freq, {f'model.layers.{i}.mlp.gate.weight' for i in (2, 3, 4)}) == ('dense', 'dense', 'moe', 'moe', 'moe')
  assert _kinds(_hf('mixtral')) == ('moe',) * _hf('mixtral')['num_hidden_layers']


@pytest.mark.parametrize('overrides,problem', [
    (dict(decoder_sparse_step=0), 'decoder_sparse_step 0'),
    (dict(mlp_only_layers=[7]), 'mlp_only_layers [7]'),
    (dict(mlp_only_layers=[0, 1, 2, 3]), 'no MoE layer'),
    (dict(num_local_experts=0), 'no MoE layer'),
    (dict(rope_parameters={'rope_type': 'llama3', 'rope_theta': 1e4, 'factor': 8.0}), "RoPE scaling 'llama3'"),
    (dict(attention_bias=True), 'attention_bias'),
    (dict(use_sliding_window=True, sliding_window=16), 'sliding_window 16'),
])
def test_configs_moejax_cannot_express_are_refused_naming_the_field(overrides, problem):
  with pytest.raises(ConvertError, match=re.escape(problem)):
    hf_config.to_moejax(_hf('qwen3_moe_mlp_only', **overrides))


def test_a_sliding_window_wider_than_the_context_never_applies_and_imports():
  hf = _hf('mixtral', sliding_window=_hf('mixtral')['max_position_embeddings'])
  assert hf_config.to_moejax(hf) == hf_config.to_moejax(_hf('mixtral'))


def test_export_refuses_a_run_whose_layer_pattern_is_not_the_imported_one():
  hf = _hf('qwen3_moe_mlp_only')
  config = base_config()
  hf_config.apply(config, hf_config.to_moejax(hf))
  assert hf_config.to_hf(config, hf) == hf
  config.model.num_dense_layers, config.model.dense_layers = 0, '1'   # the same kinds, spelled out
  assert hf_config.to_hf(config, hf) == hf
  config.model.dense_layers = '2'
  with pytest.raises(ConvertError, match=re.escape('the run has dense layers [2]')):
    hf_config.to_hf(config, hf)


@pytest.mark.parametrize('name', CASES)
def test_import_matches_transformers_and_export_returns_every_tensor(name, tmp_path):
  src = FIXTURES / name
  w = tmp_path / 'w'
  checkpoints.import_hf(str(src), str(w))
  checkpoints.logits(str(w), str(src / 'input_ids.npy'), str(tmp_path / 'logits.npy'))
  want = np.load(src / 'logits.npy')
  got = np.load(tmp_path / 'logits.npy')
  assert got.shape == want.shape and np.abs(got - want).max() < 1e-4
  checkpoints.export_hf(str(w), str(tmp_path / 'hf'))
  a, b = tensors(src), tensors(tmp_path / 'hf')
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  ca, cb = (json.loads((d / 'config.json').read_text()) for d in (src, tmp_path / 'hf'))
  assert cb['model_type'] == ca['model_type'] and cb['architectures'] == ca['architectures']
  checkpoints.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'again'))   # the export imports again
  checkpoints.logits(str(tmp_path / 'again'), str(src / 'input_ids.npy'), str(tmp_path / 'again.npy'))
  np.testing.assert_array_equal(np.load(tmp_path / 'again.npy'), got)


def test_a_training_step_runs_from_the_imported_checkpoint_and_its_experiment_describes_it(tmp_path):
  from moejax import checkpoint, sample
  from moejax.state import setup
  from moejax.train import make_train_step
  w = tmp_path / 'w'
  checkpoints.import_hf(str(FIXTURES / 'deepseek_v3'), str(w))
  import importlib.util
  spec = importlib.util.spec_from_file_location('experiment', w / 'experiment.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  exp = module.get_config()
  saved = json.loads((w / 'config.json').read_text())
  assert json.loads(exp.model.to_json()) == saved['model']
  config, _, state = sample.load(str(w))
  s = setup(config, devices=jax.devices()[:1])
  ids = np.random.default_rng(0).integers(0, config.model.vocab_size, (2, 17))
  batch = {'inputs': jnp.asarray(ids[:, :-1], jnp.int32), 'targets': jnp.asarray(ids[:, 1:], jnp.int32),
           'loss_mask': jnp.ones((2, 16), jnp.float32)}
  before = np.asarray(state['params']['embed'])   # the step donates the state it is given
  step = make_train_step(s, diagnostics=False)
  new, out = step(*step(state, batch)[:1], batch)   # two steps: warmup starts the lr at 0
  assert np.isfinite(float(out['loss'])) and int(new['step']) == 2
  assert not np.array_equal(before, np.asarray(new['params']['embed']))
  mngr = checkpoint.manager(str(w), 2, False)
  assert mngr.latest_step() == 0 and checkpoint.restore(mngr, s.abstract_state, tx=s.tx)[1]['imported_from']


def test_transformers_fused_expert_layout_imports_like_the_hub_layout(tmp_path):
  src, fused = FIXTURES / 'qwen3_moe', tmp_path / 'fused'
  fused.mkdir()
  shutil.copy(src / 'config.json', fused / 'config.json')
  t = tensors(src)
  out = {k: v for k, v in t.items() if '.experts.' not in k}
  cfg = json.loads((src / 'config.json').read_text())
  E = cfg.get('num_experts') or cfg['num_local_experts']
  for i in range(cfg['num_hidden_layers']):
    p = f'model.layers.{i}.mlp.experts.'
    gate = np.stack([t[f'{p}{e}.gate_proj.weight'] for e in range(E)])
    up = np.stack([t[f'{p}{e}.up_proj.weight'] for e in range(E)])
    out[p + 'gate_up_proj'] = np.concatenate([gate, up], axis=1)        # [E, 2F, D]
    out[p + 'down_proj'] = np.stack([t[f'{p}{e}.down_proj.weight'] for e in range(E)])   # [E, D, F]
  save_file(out, str(fused / 'model.safetensors'))
  checkpoints.import_hf(str(fused), str(tmp_path / 'a'))
  checkpoints.import_hf(str(src), str(tmp_path / 'b'))
  for w in 'ab':
    checkpoints.logits(str(tmp_path / w), str(src / 'input_ids.npy'), str(tmp_path / f'{w}.npy'))
  np.testing.assert_array_equal(np.load(tmp_path / 'a.npy'), np.load(tmp_path / 'b.npy'))


def test_a_sharded_directory_imports_like_one_file_and_export_shards_past_the_size(tmp_path):
  from moejax.convert.safetensors_io import Tensors, write
  src, sharded = FIXTURES / 'qwen3_moe_mlp_only', tmp_path / 'sharded'
  t = tensors(src)
  write(str(sharded), sorted(t.items()), shard_bytes=40_000)   # the hub's layout: shards + index
  index = json.loads((sharded / 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) > 2 and sorted(index['weight_map']) == sorted(t)
  back = Tensors(str(sharded))
  assert all(np.array_equal(back.get(k), v) and back.get(k).dtype == v.dtype for k, v in t.items())
  shutil.copy(src / 'config.json', sharded / 'config.json')
  checkpoints.import_hf(str(sharded), str(tmp_path / 'w'))
  checkpoints.logits(str(tmp_path / 'w'), str(src / 'input_ids.npy'), str(tmp_path / 'logits.npy'))
  assert np.abs(np.load(tmp_path / 'logits.npy') - np.load(src / 'logits.npy')).max() < 1e-4


def _scratch_run(w: Path, **model):
  """A workdir as moejax.train leaves it (config.json + a full step 0) for a tiny MLA model from
  scratch, with a random router bias (so a misplaced bias shows)."""
  import importlib.util
  from moejax import checkpoint
  from moejax.state import init_state, setup
  spec = importlib.util.spec_from_file_location('smoke', runs.REPO / 'experiments' / 'smoke.py')
  smoke = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(smoke)
  config = smoke.get_config()
  config.model.attention, config.model.vocab_size = 'mla', 128
  config.model.mla.update(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
  config.model.update(model)
  s = setup(config, devices=jax.devices()[:1])
  state = init_state(s)
  state['router_bias'] = jnp.asarray(np.random.default_rng(0).normal(0, 0.1, state['router_bias'].shape), jnp.float32)
  w.mkdir()
  (w / 'config.json').write_text(config.to_json_best_effort(indent=2))
  mngr = checkpoint.manager(str(w), 2, False)
  checkpoint.save(mngr, 0, state, {})
  mngr.wait_until_finished()
  return config


@pytest.mark.slow   # a training run, export and re-import (~15 s); the interop acceptance check exports too
def test_a_run_trained_from_scratch_exports_as_deepseek_v3_and_imports_back_to_the_same_state(tmp_path):
  from moejax import sample
  _scratch_run(tmp_path / 'w', num_layers=3, num_dense_layers=1, num_shared_experts=1)
  checkpoints.export_hf(str(tmp_path / 'w'), str(tmp_path / 'hf'))
  hf = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert hf['architectures'] == ['DeepseekV3ForCausalLM'] and hf['first_k_dense_replace'] == 1
  assert 'model.layers.2.mlp.gate.e_score_correction_bias' in tensors(tmp_path / 'hf')
  checkpoints.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'again'))
  (c1, _, a), (c2, _, b) = sample.load(str(tmp_path / 'w')), sample.load(str(tmp_path / 'again'))
  assert ModelConfig.from_config(c1.model).layer_kinds == ModelConfig.from_config(c2.model).layer_kinds
  for key in ('params', 'router_bias'):   # bit for bit, so the forward pass is the same
    for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_refuses_runs_no_hugging_face_architecture_expresses():
  config = base_config()
  with pytest.raises(ConvertError, match="exports as DeepSeek-V3, which needs attention 'mla'"):
    hf_config.from_moejax(config)   # base_config: GQA with sigmoid routing
  hf = _hf('qwen3_moe_mlp_only')
  for key, value in [('sinks', True), ('softcap', 30.0)]:
    run = base_config()
    hf_config.apply(run, hf_config.to_moejax(hf))
    run.model.attn[key] = value
    with pytest.raises(ConvertError, match=re.escape(f'model.attn.{key}: the run has {value!r}')):
      hf_config.to_hf(run, hf)
  run = base_config()
  hf_config.apply(run, hf_config.to_moejax(hf))
  run.model.router.update(num_zero_experts=2, target_active_experts=1.5)
  with pytest.raises(ConvertError, match='model.router.num_zero_experts'):
    hf_config.to_hf(run, hf)


def _bad_copy(tmp_path, damage) -> Path:
  d = tmp_path / 'bad'
  shutil.copytree(FIXTURES / 'mixtral', d)
  damage(d)
  return d


def _truncate(d):
  data = (d / 'model.safetensors').read_bytes()
  (d / 'model.safetensors').write_bytes(data[:len(data) // 2])


def _reshape(d):
  t = tensors(d)
  t['model.layers.1.self_attn.q_proj.weight'] = t['model.layers.1.self_attn.q_proj.weight'][:-1]
  save_file(t, str(d / 'model.safetensors'))


def _model_type(d):
  c = json.loads((d / 'config.json').read_text())
  (d / 'config.json').write_text(json.dumps({**c, 'model_type': 'gpt_oss'}))


def _act(d):
  c = json.loads((d / 'config.json').read_text())
  (d / 'config.json').write_text(json.dumps({**c, 'hidden_act': 'gelu'}))


@pytest.mark.parametrize('damage,problem', [
    (lambda d: (d / 'config.json').unlink(), 'no config.json'),
    (_truncate, 'model.safetensors: not a readable safetensors file'),
    (_reshape, 'tensor model.layers.1.self_attn.q_proj.weight: shape'),
    (_model_type, "model_type 'gpt_oss' is not one moejax converts"),
    (_act, "hidden_act 'gelu'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, damage, problem):
  d = _bad_copy(tmp_path, damage)
  w = tmp_path / 'w'
  proc = subprocess.run([sys.executable, '-m', 'moejax.convert', 'import', f'--hf={d}', f'--workdir={w}'],
                        cwd=runs.REPO, env=runs.env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.count('\n') == 1 and problem in proc.stderr, proc.stderr
  assert not w.exists() and not list(tmp_path.glob('.w.*'))


def test_the_import_is_params_only_and_restoring_it_with_the_optimizer_makes_a_fresh_state(tmp_path):
  from moejax import checkpoint, sample
  from moejax.state import setup
  w = tmp_path / 'w'
  checkpoints.import_hf(str(FIXTURES / 'qwen2_moe'), str(w))
  config, _, _ = sample.load(str(w))
  s = setup(config, devices=jax.devices()[:1])
  mngr = checkpoint.manager(str(w), 2, False)
  with pytest.raises(checkpoint.ParamsOnly):   # train.py without tx=: refused, and the step is kept
    checkpoint.restore_intact(mngr, s.abstract_state, log=lambda m: None)
  assert mngr.all_steps() == [0] and not (w / 'checkpoints_unreadable').exists()
  state, data, step = checkpoint.restore_intact(mngr, s.abstract_state, log=lambda m: None, tx=s.tx)
  assert step == 0 and data['imported_from'] and data[checkpoint.PARAMS_ONLY]
  assert jax.tree.structure(state) == jax.tree.structure(s.abstract_state)
  fresh = s.tx.init(state['params'])
  for a, b in zip(jax.tree.leaves(state['opt_state']), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
