"""Shared pytest setup: 8 fake CPU devices (for mesh tests), a tiny model config and meshes.

The environment variables must be set before jax is first imported, so they are set at the top of
this module (pytest imports conftest.py before the test modules).

`jax_numpy_rank_promotion='raise'` is deliberately NOT enabled: the library relies on implicit rank
promotion in `moejax/attention.py` (rms_norm: `y * scale`, [..., D] * [D]) and `moejax/moe.py`
(route: `scores_TE + bias_E`, [T, E] + [E]), so 'raise' makes every forward pass fail.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the session: most of a tiny test's time is XLA compiling the
# same train step again (in each test, xdist worker and `python -m moejax.train` subprocess). The
# controller makes it fresh (workers and subprocesses inherit the variable) and removes it at exit.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='moejax-test-jax-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from moejax import configs, params, sharding  # noqa: E402
from moejax.model_config import ModelConfig  # noqa: E402

# config.model overrides; a dict value updates that group (model.attn, model.mla, ...).
TINY_MODEL = dict(
    vocab_size=128, d_model=32, num_experts=8, expert_ffn_dim=16, dense_ffn_dim=64, num_layers=3,
    num_dense_layers=1, attn=dict(num_heads=4, num_kv_heads=2, head_dim=8),
    mla=dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, q_lora_rank=0),
)

# name -> {mesh axis: size}; all use the first prod(sizes) devices.
MESH_SHAPES = {
    'single': {'data': 1, 'expert': 1},
    'data8': {'data': 8, 'expert': 1},
    'data2_expert4': {'data': 2, 'expert': 4},
    'expert8': {'data': 1, 'expert': 8},
}


def update_model(m, overrides: dict):
  """Sets config.model fields in place; a dict value updates that group (attn={'qk_norm': True})."""
  for k, v in overrides.items():
    if k not in m:   # a stray key would be ignored by ModelConfig, silently testing the default
      raise KeyError(f'config.model has no {k!r} (moved into a group? see docs/layout.md)')
    if isinstance(v, dict):
      update_model(m[k], v)
    else:
      m[k] = v
  return m


def tiny_model_dict(**overrides):
  """base_config().model (a ConfigDict) shrunk to tiny shapes, with optional overrides."""
  return update_model(update_model(configs.base_config().model, TINY_MODEL), overrides)


def tiny_model_config(**overrides) -> ModelConfig:
  """The typed ModelConfig of tiny_model_dict(**overrides)."""
  return ModelConfig.from_config(tiny_model_dict(**overrides))


def make_test_mesh(shape: dict):
  n = 1
  for s in shape.values():
    n *= s
  return sharding.make_mesh(dict(shape), jax.devices()[:n])


def numpy_init_params(specs, seed: int):
  """Like `params.init_params` (std = spec.scale, clipped at 2 std) but drawn with numpy: eager
  `init_params` compiles one program per distinct shape (~9 s for the tiny model on 2 cores)."""
  rng = np.random.default_rng(seed)

  def one(s):
    if s.init == 'ones':
      return jnp.ones(s.shape, jnp.float32)
    if s.init == 'zeros':
      return jnp.zeros(s.shape, jnp.float32)
    return jnp.asarray(np.clip(rng.standard_normal(s.shape), -2, 2) * s.scale, jnp.float32)

  return jax.tree.map(one, specs, is_leaf=params.is_spec)


@pytest.fixture
def tiny_cfg():
  return tiny_model_config()


@pytest.fixture(scope='session')
def meshes():
  """All test meshes by name (see MESH_SHAPES)."""
  assert len(jax.devices()) >= 8, 'conftest must set XLA_FLAGS before jax is imported'
  return {name: make_test_mesh(shape) for name, shape in MESH_SHAPES.items()}


@pytest.fixture(scope='session')
def single_mesh(meshes):
  return meshes['single']
