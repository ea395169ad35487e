"""Config validation: every bad value is a ConfigError whose message starts with the field's name,
and the training CLI reports it as one line, without a traceback, before compiling anything."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moejax.data.ensure import ensure_data
from moejax import optim
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
    ('qk_norm_on_mla', {'model.attention': 'gqa,mla', 'model.attn.qk_norm': True}, 'model.attn.qk_norm'),
    ('negative_softcap', {'model.attn.softcap': -1.0}, 'model.attn.softcap'),
    ('unknown_rope_layout', {'model.attn.rope_layout': 'interleaved'}, 'model.attn.rope_layout'),
    ('unknown_qk_norm_scope', {'model.attn.qk_norm_scope': 'heads', 'model.attn.qk_norm': True},
     'model.attn.qk_norm_scope'),
    ('projection_qk_norm_scope_without_qk_norm', {'model.attn.qk_norm_scope': 'projection'},
     'model.attn.qk_norm_scope'),
    ('qkv_bias_on_mla', {'model.attention': 'mla', 'model.attn.qkv_bias': True}, 'model.attn.qkv_bias'),
    ('yarn_factor_below_one', {'model.attn.yarn_factor': 0.5, 'model.attn.yarn_original_max_len': 64},
     'model.attn.yarn_factor'),
    ('yarn_without_original_len', {'model.attn.yarn_factor': 4.0}, 'model.attn.yarn_original_max_len'),
    ('yarn_zero_beta_fast', {'model.attn.yarn_factor': 4.0, 'model.attn.yarn_original_max_len': 64,
                             'model.attn.yarn_beta_fast': 0.0}, 'model.attn.yarn_beta_fast'),
    ('yarn_negative_mscale_all_dim', {'model.attn.yarn_factor': 4.0, 'model.attn.yarn_original_max_len': 64,
                                      'model.attn.yarn_mscale_all_dim': -1.0}, 'model.attn.yarn_mscale_all_dim'),
    ('qk_clip_with_qk_norm', {'optim.qk_clip': 50.0, 'model.attn.qk_norm': True}, 'optim.qk_clip'),
    ('qk_clip_with_nsa', {'optim.qk_clip': 50.0, 'model.attention': 'nsa'}, 'optim.qk_clip'),
    ('unknown_optimizer', {'optim.name': 'sgdd'}, 'optim.name'),
    ('unknown_dispatch', {'model.dispatch': 'scatter'}, 'model.dispatch'),
    ('unknown_attention_implementation', {'model.attn.implementation': 'flash'}, 'model.attn.implementation'),
    ('fused_attention_with_sinks', {'model.attn.implementation': 'tokamax', 'model.attn.sinks': True},
     'model.attn.implementation'),
    ('unknown_router_score', {'model.router.score': 'tanh'}, 'model.router.score'),
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
    ('d_model_not_div_fsdp', {'mesh.data': 1, 'mesh.fsdp': 8, 'model.d_model': 68, 'model.attn.num_heads': 4},
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


# ----------------------------------------------------------------------------- typed component configs

from dataclasses import FrozenInstanceError, replace  # noqa: E402

from conftest import tiny_model_dict, update_model  # noqa: E402
from moejax import cli  # noqa: E402
from moejax.attention.config import AttentionConfig, KDAConfig, MLAConfig, NSAConfig  # noqa: E402
from moejax.model_config import LossConfig, ModelConfig  # noqa: E402
from moejax.moe import DispatchConfig  # noqa: E402
from moejax.router import RouterConfig  # noqa: E402

# (id, config.model overrides (a dict updates that group), field the message must start with,
#  text it must also contain)
BAD_COMPONENT_VALUES = [
    ('attn_heads_not_div_d_model', dict(d_model=64, attn=dict(num_heads=3, num_kv_heads=1)),
     'model.d_model', 'model.attn.num_heads (3)'),
    ('attn_kv_heads_not_div_heads', dict(attn=dict(num_kv_heads=3)), 'model.attn.num_kv_heads', '3'),
    ('attn_odd_head_dim', dict(attn=dict(head_dim=7)), 'model.attn.head_dim', 'even'),
    ('attn_negative_softcap', dict(attn=dict(softcap=-1.0)), 'model.attn.softcap', '-1'),
    ('attn_zero_window', dict(attn=dict(window=0)), 'model.attn.window', '0'),
    ('mla_odd_rope_dim', dict(mla=dict(qk_rope_head_dim=7)), 'model.mla.qk_rope_head_dim', 'even'),
    ('mla_negative_q_rank', dict(mla=dict(q_lora_rank=-1)), 'model.mla.q_lora_rank', '-1'),
    ('nsa_one_selected', dict(nsa=dict(num_selected=1)), 'model.nsa.num_selected', '1'),
    ('kda_zero_chunk', dict(kda=dict(chunk=0)), 'model.kda.chunk', '0'),
    ('router_unknown_score', dict(router=dict(score='tanh')), 'model.router.score', "'tanh'"),
    ('router_unknown_mode', dict(router=dict(bias_update_mode='pid')), 'model.router.bias_update_mode', "'pid'"),
    ('router_zero_experts_without_target', dict(router=dict(num_zero_experts=2)),
     'model.router.target_active_experts', '0.0'),
    ('router_top_k_zero', dict(top_k=0), 'model.top_k', '0'),
    ('router_negative_bias_rate', dict(bias_update_rate=-1e-3), 'model.bias_update_rate', '-0.001'),
    ('dispatch_unknown', dict(dispatch='nope'), 'model.dispatch', "'nope'"),
    ('dispatch_zero_capacity', dict(dispatch='capacity', capacity_factor=0.0), 'model.capacity_factor', '0.0'),
    ('loss_negative_z_weight', dict(loss=dict(z_weight=-1.0)), 'model.loss.z_weight', '-1'),
    ('loss_negative_balance_weight', dict(loss=dict(balance_weight=-0.1)), 'model.loss.balance_weight', '-0.1'),
    ('loss_unknown_balance_scope', dict(loss=dict(balance_scope='batch')), 'model.loss.balance_scope', "'batch'"),
    ('model_unknown_block', dict(block='parallel'), 'model.block', "'parallel'"),
    ('model_unknown_precision', dict(precision='fp16'), 'model.precision', "'fp16'"),
    ('model_dense_layers_gt_layers', dict(num_dense_layers=4), 'model.num_dense_layers', '4'),
    ('model_zero_vocab', dict(vocab_size=0), 'model.vocab_size', '0'),
]


def _assert_one_line_error(info, field, text):
  msg = str(info.value)
  assert msg.startswith(field + ':'), msg
  assert '\n' not in msg, msg
  assert text in msg, msg


@pytest.mark.parametrize('overrides,field,text', [c[1:] for c in BAD_COMPONENT_VALUES],
                         ids=[c[0] for c in BAD_COMPONENT_VALUES])
def test_model_config_bad_component_value_is_a_one_line_config_error_naming_the_field(overrides, field, text):
  m = tiny_model_dict()
  update_model(m, overrides)
  with pytest.raises(ConfigError) as info:
    ModelConfig.from_config(m)
  _assert_one_line_error(info, field, text)


# Each typed dataclass on its own (dataclasses.replace runs its __post_init__ checks).
_ATTN = AttentionConfig(d_model=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)
_ROUTER = RouterConfig(num_experts=8, top_k=2)
BAD_DATACLASS_VALUES = [
    ('attention_heads', lambda: replace(_ATTN, num_heads=3), 'model.d_model', 'model.attn.num_heads (3)'),
    ('attention_kv_heads', lambda: replace(_ATTN, num_kv_heads=0), 'model.attn.num_kv_heads', '0'),
    ('attention_softcap', lambda: replace(_ATTN, softcap=-2.0), 'model.attn.softcap', '-2'),
    ('mla_kv_rank', lambda: MLAConfig(kv_lora_rank=0), 'model.mla.kv_lora_rank', '0'),
    ('nsa_num_selected', lambda: NSAConfig(num_selected=1), 'model.nsa.num_selected', '1'),
    ('nsa_stride', lambda: NSAConfig(stride=-8), 'model.nsa.stride', '-8'),
    ('kda_conv', lambda: KDAConfig(conv=0), 'model.kda.conv', '0'),
    ('router_score', lambda: replace(_ROUTER, score='tanh'), 'model.router.score', "'tanh'"),
    ('router_top_k', lambda: replace(_ROUTER, top_k=9), 'model.top_k', '9'),
    ('router_schedule', lambda: replace(_ROUTER, bias_update_schedule='cosine'),
     'model.router.bias_update_schedule', "'cosine'"),
    ('router_bias_center_with_zero_experts',
     lambda: replace(_ROUTER, num_zero_experts=2, target_active_experts=1.5, bias_center=True),
     'model.router.bias_center', 'target_active_experts'),
    ('dispatch_name', lambda: DispatchConfig(name='nope'), 'model.dispatch', "'nope'"),
    ('dispatch_capacity', lambda: DispatchConfig(capacity_factor=-1.0), 'model.capacity_factor', '-1'),
    ('loss_z_weight', lambda: LossConfig(z_weight=-1.0), 'model.loss.z_weight', '-1'),
    ('loss_hidden_z_weight', lambda: LossConfig(hidden_z_weight=-1e-6), 'model.loss.hidden_z_weight', '-1e-06'),
    ('loss_gnr_target', lambda: LossConfig(balance_gnr_target=-0.5), 'model.loss.balance_gnr_target', '-0.5'),
]


@pytest.mark.parametrize('build,field,text', [c[1:] for c in BAD_DATACLASS_VALUES],
                         ids=[c[0] for c in BAD_DATACLASS_VALUES])
def test_each_typed_dataclass_checks_its_own_fields(build, field, text):
  with pytest.raises(ConfigError) as info:
    build()
  _assert_one_line_error(info, field, text)


def test_typed_configs_are_frozen_and_built_from_the_groups():
  m = tiny_model_dict(dispatch='capacity', attn=dict(qk_norm=True, document_mask=True),
                      router=dict(score='softmax'), loss=dict(z_weight=1e-3), nsa=dict(num_selected=3))
  cfg = ModelConfig.from_config(m)
  assert cfg.attn.qk_norm and cfg.document_mask and cfg.attn.nsa.num_selected == 3
  assert cfg.attn.d_model == cfg.d_model == m.d_model and cfg.attn.num_heads == m.attn.num_heads
  assert cfg.router.score == 'softmax' and cfg.router.num_experts == m.num_experts
  assert cfg.dispatch == DispatchConfig(name='capacity', capacity_factor=m.capacity_factor,
                                        num_experts=m.num_experts, fp8=False)
  assert cfg.loss == LossConfig(z_weight=1e-3)
  with pytest.raises(FrozenInstanceError):
    cfg.attn.num_heads = 8
  with pytest.raises(ConfigError, match=r'^model\.attn\.num_kv_heads: '):
    replace(cfg, attn=replace(cfg.attn, num_kv_heads=3))


# ----------------------------------------------------------------------------- CLI: unknown keys, missing files

# The issue-12 renames: old flat key -> its new home.
MOVED_KEYS = {
    'model.num_heads': 'model.attn.num_heads', 'model.num_kv_heads': 'model.attn.num_kv_heads',
    'model.head_dim': 'model.attn.head_dim', 'model.rope_theta': 'model.attn.rope_theta',
    'model.document_mask': 'model.attn.document_mask', 'model.qk_norm': 'model.attn.qk_norm',
    'model.attn_softcap': 'model.attn.softcap', 'model.attn_sinks': 'model.attn.sinks',
    'model.window': 'model.attn.window',
    'model.q_lora_rank': 'model.mla.q_lora_rank', 'model.kv_lora_rank': 'model.mla.kv_lora_rank',
    'model.qk_nope_head_dim': 'model.mla.qk_nope_head_dim',
    'model.qk_rope_head_dim': 'model.mla.qk_rope_head_dim', 'model.v_head_dim': 'model.mla.v_head_dim',
    'model.nsa_block': 'model.nsa.block', 'model.nsa_stride': 'model.nsa.stride',
    'model.nsa_select_block': 'model.nsa.select_block', 'model.nsa_num_selected': 'model.nsa.num_selected',
    'model.kda_chunk': 'model.kda.chunk', 'model.kda_conv': 'model.kda.conv',
    'model.router_score': 'model.router.score', 'model.norm_topk': 'model.router.norm_topk',
    'model.routed_scaling': 'model.router.routed_scaling',
    'model.num_zero_experts': 'model.router.num_zero_experts',
    'model.target_active_experts': 'model.router.target_active_experts',
    'model.bias_update_mode': 'model.router.bias_update_mode',
    'model.bias_update_schedule': 'model.router.bias_update_schedule',
    'model.bias_update_final': 'model.router.bias_update_final',
    'model.bias_center': 'model.router.bias_center',
    'model.balance_loss_weight': 'model.loss.balance_weight',
    'model.balance_loss_scope': 'model.loss.balance_scope',
    'model.balance_gnr_target': 'model.loss.balance_gnr_target',
    'model.z_loss_weight': 'model.loss.z_weight', 'model.hidden_z_loss_weight': 'model.loss.hidden_z_weight',
}


def _train_cli(tmp_path, *args):
  return subprocess.run(
      [sys.executable, '-m', 'moejax.train', f'--workdir={tmp_path / "run"}', *args],
      cwd=REPO, env=_cli_env(), capture_output=True, text=True, timeout=120)


def _one_error_line(proc) -> str:
  assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert 'Traceback' not in proc.stdout + proc.stderr, proc.stderr[-4000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert not proc.stdout.strip(), proc.stdout
  return lines[0]


def _closest(line: str) -> list[str]:
  assert '; closest: ' in line, line
  return line.split('; closest: ', 1)[1].split(', ')


def test_cli_unknown_override_fails_with_one_line_naming_the_key_and_closest_valid_keys(tmp_path):
  proc = _train_cli(tmp_path, '--config=experiments/smoke.py', '--config.model.nonexistent_key=1')
  line = _one_error_line(proc)
  assert '--config.model.nonexistent_key' in line, line
  near = _closest(line)
  valid = set(cli.leaf_keys(smoke_config()))
  assert near and all(k in valid for k in near), (near, line)
  assert not (tmp_path / 'run').exists()


def test_cli_missing_experiment_file_fails_with_one_line_naming_the_path(tmp_path):
  proc = _train_cli(tmp_path, '--config=experiments/nope.py')
  line = _one_error_line(proc)
  assert 'experiments/nope.py' in line, line
  assert not (tmp_path / 'run').exists()


def test_cli_old_flat_key_names_its_new_home_among_the_closest(tmp_path):
  proc = _train_cli(tmp_path, '--config=experiments/smoke.py', '--config.model.num_heads=8')
  line = _one_error_line(proc)
  assert '--config.model.num_heads' in line, line
  assert 'model.attn.num_heads' in _closest(line), line


@pytest.mark.parametrize('old,new', MOVED_KEYS.items(), ids=list(MOVED_KEYS))
def test_every_moved_key_names_its_new_home_among_the_closest(old, new, monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit) as info:
    cli.check_config_args(['train', '--config=experiments/smoke.py', f'--config.{old}=1'], 'x.py')
  assert info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: --config.{old}: '), lines
  assert new in _closest(lines[0]), lines


@pytest.mark.parametrize('removed', ['model.compute_dtype', 'data.vocab_size'])
def test_removed_keys_are_refused(removed, monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit):
    cli.check_config_args(['train', '--config=experiments/smoke.py', f'--config.{removed}=1'], 'x.py')
  assert f'--config.{removed}: no such setting' in capsys.readouterr().err


def test_known_overrides_pass_the_cli_check(monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  cli.check_config_args(['train', '--config=experiments/smoke.py', '--config.model.attn.num_heads=8',
                         '--config.optim.groups.hidden.name=contrib.muon'], 'x.py')
  assert not capsys.readouterr().err


BAD_COMPONENT_CLI = [
    ('router_score', ['--config.model.router.score=tanh'], 'model.router.score'),
    ('nsa_num_selected', ['--config.model.nsa.num_selected=1'], 'model.nsa.num_selected'),
    ('loss_z_weight', ['--config.model.loss.z_weight=-1'], 'model.loss.z_weight'),
]


@pytest.mark.parametrize('args,field', [c[1:] for c in BAD_COMPONENT_CLI], ids=[c[0] for c in BAD_COMPONENT_CLI])
def test_cli_bad_component_value_fails_with_one_line_naming_the_field(tmp_path, args, field):
  proc = _train_cli(tmp_path, '--config=experiments/smoke.py', *args)
  assert proc.returncode != 0
  lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith(f'error: {field}: '), proc.stdout + proc.stderr
  assert 'Traceback' not in proc.stderr


def test_optimizer_group_placeholder_takes_a_command_line_value_that_reaches_the_optimizer(monkeypatch):
  """The group's None markers (ml_collections placeholders) parse a value given the way the CLI
  gives it (config_flags), and the optimizer is built from it; None keeps inheriting."""
  from absl import flags
  from ml_collections import config_flags
  argv = ['prog', '--config=experiments/smoke.py', '--config.optim.groups.hidden.name=contrib.muon',
          '--config.optim.groups.router.lr=0.001']
  monkeypatch.setattr(sys, 'argv', argv)   # config_flags reads the overrides from sys.argv
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'experiment', flag_values=fv)
  fv(argv)
  o = fv.config.optim
  assert o.groups.hidden.name == 'contrib.muon' and o.groups.embed.name is None
  assert o.groups.router.lr == pytest.approx(1e-3) and o.groups.hidden.lr is None
  assert optim.group_spec(o, 'hidden', 10)[0] == 'contrib.muon'
  assert optim.group_spec(o, 'embed', 10)[0] == 'adamw'   # None: optim.name


@pytest.mark.slow
def test_cli_optimizer_group_placeholder_is_overridable_and_reaches_the_optimizer(tmp_path):
  """The group's None markers (ml_collections placeholders) take a CLI value; the run's group table
  (what moejax.optim builds the optimizer from) shows it, and one step trains."""
  proc = _train_cli(tmp_path, '--config=experiments/smoke.py', '--config.optim.groups.hidden.name=contrib.muon',
                    '--config.optim.groups.router.lr=0.001', '--config.train.steps=1',
                    '--config.train.eval_every=1', '--config.checkpoint.every=1')
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  rows = {l.split()[0]: l.split() for l in proc.stdout.splitlines()
          if l.split() and l.split()[0] in ('hidden', 'embed', 'router', 'vectors')}
  assert rows['hidden'][1] == 'contrib.muon', proc.stdout
  assert rows['embed'][1] == rows['vectors'][1] == 'adamw', proc.stdout   # None: optim.name
  assert float(rows['router'][2]) == pytest.approx(1e-3), proc.stdout
  assert float(rows['hidden'][2]) == pytest.approx(smoke_config().optim.lr), proc.stdout
  config = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert config['optim']['groups']['hidden']['name'] == 'contrib.muon'
  assert config['optim']['groups']['embed']['name'] is None
