"""Config validation: every bad value is a ConfigError whose message starts with the field's name,
and the training CLI reports it as one line, without a traceback, before compiling anything."""
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moejax.state import ensure_data
from moejax.validate import ConfigError, validate

REPO = Path(__file__).resolve().parents[1]
NUM_DEVICES = 8


def smoke_config():
  spec = importlib.util.spec_from_file_location('smoke_experiment', REPO / 'experiments' / 'smoke.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  # Paths in the experiment are relative to the repo root; make them independent of the cwd.
  config.data.dir = str(REPO / config.data.dir)
  config.data.raw = str(REPO / config.data.raw)
  return config


@pytest.fixture(scope='module')
def prepared_smoke_data():
  """Prepares the smoke corpus (as training does on first use) so data checks can run."""
  config = smoke_config()
  ensure_data(config)
  assert (Path(config.data.dir) / 'manifest.json').is_file()
  return config.data.dir


def _set(config, dotted: str, value):
  *parents, leaf = dotted.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


# (id, {field: value}, field the message must start with)
BAD_CONFIGS = [
    ('top_k_gt_num_experts', {'model.top_k': 1000}, 'model.top_k'),
    ('num_experts_zero', {'model.num_experts': 0}, 'model.num_experts'),
    ('d_model_not_div_heads', {'model.d_model': 66}, 'model.d_model'),
    ('unknown_attention', {'model.attention': 'flashy'}, 'model.attention'),
    ('qk_norm_on_mla', {'model.attention': 'gqa,mla', 'model.qk_norm': True}, 'model.qk_norm'),
    ('negative_softcap', {'model.attn_softcap': -1.0}, 'model.attn_softcap'),
    ('qk_clip_with_qk_norm', {'optim.qk_clip': 50.0, 'model.qk_norm': True}, 'optim.qk_clip'),
    ('qk_clip_with_nsa', {'optim.qk_clip': 50.0, 'model.attention': 'nsa'}, 'optim.qk_clip'),
    ('unknown_optimizer', {'optim.name': 'sgdd'}, 'optim.name'),
    ('unknown_dispatch', {'model.dispatch': 'scatter'}, 'model.dispatch'),
    ('fp8_grouped_dispatch', {'model.dispatch': 'ragged_dot', 'model.precision': 'fp8'}, 'model.dispatch'),
    ('unknown_router_score', {'model.router_score': 'tanh'}, 'model.router_score'),
    ('unknown_remat', {'model.remat': 'everything'}, 'model.remat'),
    ('mesh_product_ne_devices', {'mesh.data': 3, 'mesh.expert': 1}, 'mesh'),
    ('mesh_product_too_big', {'mesh.data': 4, 'mesh.expert': 4}, 'mesh'),
    ('two_minus_one_axes', {'mesh.data': -1, 'mesh.expert': -1}, 'mesh'),
    ('batch_not_div_data_x_expert', {'mesh.data': 2, 'mesh.expert': 4, 'train.batch_size': 12},
     'train.batch_size'),
    ('num_experts_not_div_mesh_expert', {'mesh.data': 2, 'mesh.expert': 4, 'model.num_experts': 6},
     'model.num_experts'),
    ('batch_not_div_data_x_fsdp', {'mesh.data': 2, 'mesh.fsdp': 4, 'train.batch_size': 12},
     'train.batch_size'),
    ('unknown_mesh_axis', {'mesh.model': 2, 'mesh.data': 4}, 'mesh.model'),
    ('unknown_mesh_axis_in_rule', {'sharding.embed': 'fsd'}, 'sharding.embed'),
    ('mesh_axis_twice_in_rule', {'sharding.batch': 'data,data'}, 'sharding.batch'),
    ('unknown_logical_axis', {'sharding.embd': 'fsdp'}, 'sharding.embd'),
    ('kv_heads_not_div_tensor', {'mesh.data': 2, 'mesh.tensor': 4}, 'sharding.kv_heads'),
    ('d_model_not_div_fsdp', {'mesh.data': 1, 'mesh.fsdp': 8, 'model.d_model': 68, 'model.num_heads': 4},
     'sharding.embed'),
    ('expert_weights_replicated', {'mesh.data': 2, 'mesh.expert': 4, 'sharding.expert': ''},
     'sharding.expert'),
    ('expert_ffn_not_div_tensor', {'mesh.data': 4, 'mesh.tensor': 2, 'model.expert_ffn_dim': 15},
     'model.expert_ffn_dim'),
    ('seq_len_zero', {'train.seq_len': 0}, 'train.seq_len'),
    ('seq_len_negative', {'train.seq_len': -4}, 'train.seq_len'),
]


def _assert_config_error(config, field, **kw):
  with pytest.raises(ConfigError) as info:
    validate(config, NUM_DEVICES, **kw)
  msg = str(info.value)
  assert msg.startswith(field + ':'), msg
  assert '\n' not in msg.strip(), msg
  return msg


@pytest.mark.parametrize('overrides,field', [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_value_raises_config_error_starting_with_field(overrides, field):
  config = smoke_config()
  for k, v in overrides.items():
    _set(config, k, v)
  _assert_config_error(config, field, check_data=False)


def test_mesh_axes_may_be_absent_or_size_one():
  config = smoke_config()
  config.mesh = {'data': 2, 'fsdp': -1}
  assert validate(config, NUM_DEVICES, check_data=False) == {'data': 2, 'fsdp': 4}
  config.mesh = {'tensor': 2, 'expert': 2, 'fsdp': 2, 'data': 1}   # resolved in canonical order
  assert list(validate(config, NUM_DEVICES, check_data=False)) == ['data', 'fsdp', 'expert', 'tensor']


def test_sharding_rules_may_split_experts_over_expert_and_fsdp():
  config = smoke_config()
  config.mesh = {'data': 1, 'fsdp': 2, 'expert': 4, 'tensor': 1}
  config.sharding.expert = 'expert,fsdp'
  validate(config, NUM_DEVICES, check_data=False)


def test_missing_data_dir_without_raw_text_raises_config_error_naming_data_dir(tmp_path):
  config = smoke_config()
  config.data.dir = str(tmp_path / 'nonexistent_prepared')
  config.data.raw = str(tmp_path / 'nonexistent_raw')
  msg = _assert_config_error(config, 'data.dir', check_data=True)
  assert config.data.dir in msg


def test_vocab_smaller_than_tokenizer_raises_config_error_naming_vocab_size(prepared_smoke_data):
  config = smoke_config()
  config.model.vocab_size = 100
  _assert_config_error(config, 'model.vocab_size', check_data=True)


def test_valid_smoke_config_passes_including_data_checks(prepared_smoke_data):
  sizes = validate(smoke_config(), NUM_DEVICES, check_data=True)
  # smoke mesh is data=-1 and 1 for the rest: -1 takes all 8 devices
  assert sizes == {'data': 8, 'fsdp': 1, 'expert': 1, 'tensor': 1}


@pytest.mark.parametrize('mesh,expected', [
    ({'data': -1, 'expert': 4}, {'data': 2, 'expert': 4}),
    ({'data': 2, 'expert': -1}, {'data': 2, 'expert': 4}),
    ({'data': -1, 'expert': 8}, {'data': 1, 'expert': 8}),
    ({'data': 2, 'fsdp': -1}, {'data': 2, 'fsdp': 4}),
])
def test_minus_one_mesh_axis_takes_remaining_devices(mesh, expected):
  config = smoke_config()
  for k, v in mesh.items():
    config.mesh[k] = v
  assert validate(config, NUM_DEVICES, check_data=False) == {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1, **expected}


# ----------------------------------------------------------------------------- CLI


CLI_CASES = [
    ('top_k', ['--config.model.top_k=1000'], 'model.top_k'),
    ('mesh', ['--config.mesh.data=3'], 'mesh'),
    ('data_dir', ['--config.data.dir=/nonexistent', '--config.data.raw=/nonexistent'], 'data.dir'),
]


def _cli_env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


@pytest.mark.parametrize('args,field', [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_config_fails_fast_with_one_line_naming_field(tmp_path, args, field):
  workdir = tmp_path / 'run'
  t0 = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, '-m', 'moejax.train', '--config=experiments/smoke.py', f'--workdir={workdir}', *args],
      cwd=REPO, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
  elapsed = time.perf_counter() - t0
  out = proc.stdout
  assert proc.returncode != 0, out
  lines = [l for l in out.splitlines() if l.strip()]
  assert len(lines) == 1, out
  assert field + ':' in lines[0], out
  assert 'Traceback' not in out
  assert elapsed < 20, f'took {elapsed:.1f}s: should fail before compiling'
  assert not (workdir / 'checkpoints').exists()
