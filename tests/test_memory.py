"""moejax.tools.memory against real runs: the state's bytes per device exactly against the buffers
of a sharded state on 8 CPU devices, and the activation estimate against XLA's buffer assignment."""
import math

import jax
import jax.numpy as jnp
import pytest
from layouts import LAYOUTS, layout_config, run_layout

from moejax import configs, sharding
from moejax.model_config import ModelConfig
from moejax.state import build_setup
from moejax.tools import memory
from moejax.train import make_train_step

FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
ACTIVATION_RTOL = 0.25   # measured: -2% (remat full), -19% (remat none) for the model below


def device_bytes(tree) -> dict:
  """{device: bytes of the shards it holds} over every array of the tree."""
  out = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


@pytest.mark.parametrize('name', ['data2_fsdp2_expert2', 'fsdp2_tensor4'])
def test_state_bytes_per_device_equal_the_real_shards(name):
  sizes, rules = LAYOUTS[name]
  _, _, _, state = run_layout(name)   # the train step's output state on 8 CPU devices
  want = memory.state_bytes(layout_config(sizes, rules), sizes)
  got = {k: device_bytes(state[k]) for k in ('params', 'opt_state')}
  got['other'] = device_bytes({k: v for k, v in state.items() if k not in ('params', 'opt_state')})
  for part in ('params', 'opt_state', 'other'):
    assert set(got[part].values()) == {want[part]}, (part, got[part], want[part])
  assert want['grads'] == want['params']
  # sharding really saves memory: well under the single-device bytes
  single = memory.state_bytes(layout_config({'data': 1}, {}), {'data': 1})
  assert want['params'] < single['params'] / 2


def probe_config(batch_size: int, remat: str):
  c = configs.base_config()
  c.model.update(dict(vocab_size=256, d_model=64, num_experts=8, top_k=2, expert_ffn_dim=32,
                      dense_ffn_dim=128, num_layers=3, num_dense_layers=1, remat=remat))
  c.model.attn.update(dict(num_heads=4, num_kv_heads=2, head_dim=16))
  c.train.batch_size, c.train.seq_len = batch_size, 64
  c.mesh = {'data': 1}
  return c


def temp_bytes(config) -> int:
  s = build_setup(config, sharding.make_mesh(dict(config.mesh), jax.devices()[:1]))
  t = config.train
  batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), d, sharding=s.batch_sharding)
           for k, d in (('inputs', jnp.int32), ('targets', jnp.int32), ('loss_mask', jnp.float32))}
  compiled = make_train_step(s, diagnostics=False).lower(s.abstract_state, batch).compile(compiler_options=FAST_COMPILE)
  stats = compiled.memory_analysis()
  assert stats is not None, 'XLA:CPU reports a memory analysis'
  return stats.temp_size_in_bytes


@pytest.mark.parametrize('remat', ['full', pytest.param('none', marks=pytest.mark.slow)])
def test_activation_estimate_matches_xla_buffer_assignment(remat):
  """Activations grow with the tokens; XLA's temporaries also hold batch-independent buffers
  (gradients, optimizer updates), so compare the growth from 4 to 8 sequences."""
  small, large = probe_config(4, remat), probe_config(8, remat)
  measured = temp_bytes(large) - temp_bytes(small)
  estimate = memory.activation_bytes(large, {'data': 1}) - memory.activation_bytes(small, {'data': 1})
  assert measured > 0
  assert abs(estimate - measured) <= ACTIVATION_RTOL * measured, (estimate, measured)
  # remat full keeps a small fraction of what no remat keeps
  assert memory.activation_bytes(probe_config(8, 'full'), {'data': 1}) < memory.activation_bytes(probe_config(8, 'none'), {'data': 1})


def test_memory_table_for_64_devices_is_computed_without_devices():
  text = memory.report()
  for name in ('moe_1b', 'moe_20b'):
    assert f'| {name} |' in text
  c = memory.load_config('experiments/moe_20b.py')
  sizes = sharding.mesh_shape(dict(c.mesh), 64)
  assert math.prod(sizes.values()) == 64 and sizes['expert'] == 4
  r = memory.memory(c, sizes)
  abstract = build_setup(c, memory.abstract_mesh(sizes)).abstract_state['params']
  total_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract))
  # params are float32 and split 16-64 ways: between 1/64 and 1/16 of their bytes per device
  assert 4 * total_params / 64 <= r.params <= 4 * total_params / 16
  assert r.opt_state >= 2 * r.params * 0.99   # Adam's two moments


def test_activation_estimate_comes_from_the_attention_table_and_names_a_type_without_one():
  from moejax.attention import ATTENTIONS
  c = probe_config(8, 'none')
  m = ModelConfig.from_config(c.model)
  for name, entry in ATTENTIONS.items():
    if entry.activations is None:
      with pytest.raises(ValueError, match=f'attention {name} has no activation estimate'):
        memory.attention_elements(m, name, 64, 1)
    else:
      assert memory.attention_elements(m, name, 64, 1) == entry.activations(m.attn, 64, 1)
  assert {n for n, a in ATTENTIONS.items() if a.activations} >= {'gqa', 'mha', 'swa', 'mla'}
