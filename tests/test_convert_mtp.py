"""DeepSeek-V3 multi-token prediction layers through moejax.convert (moejax/convert/mtp.py): a
checkpoint without them (transformers' layout) imports with MTP off and exports bit for bit; one
with them (the hub layout, made here by adding a module to the tiny fixture) imports each tensor
into its place and exports every tensor back bit for bit; bad MTP tensors fail in one line."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moejax import sample
from moejax.convert import checkpoints
from moejax.convert.hf_config import ConvertError

FIXTURE = Path(__file__).parent / 'fixtures' / 'hf' / 'deepseek_v3'


def tensors(d) -> dict:
  out = {}
  for f in sorted(Path(d).glob('*.safetensors')):
    out.update(load_file(str(f)))
  return out


def with_mtp(tmp_path, damage=None) -> Path:
  """The fixture plus one MTP module at layer L (random weights shaped like the last layer's, its
  own norms and projection, copies of the embedding and head) in a second safetensors file."""
  d = tmp_path / 'mtp_src'
  shutil.copytree(FIXTURE, d)
  hf = json.loads((d / 'config.json').read_text())
  L, D = hf['num_hidden_layers'], hf['hidden_size']
  assert hf['num_nextn_predict_layers'] == 1
  t, rng = tensors(FIXTURE), np.random.default_rng(0)
  last = f'model.layers.{L - 1}.'
  extra = {f'model.layers.{L}.' + k[len(last):]: (0.05 * rng.standard_normal(v.shape)).astype(v.dtype)
           for k, v in t.items() if k.startswith(last)}
  m = f'model.layers.{L}.'
  extra.update({m + 'enorm.weight': 1 + 0.1 * rng.standard_normal(D).astype(np.float32),
                m + 'hnorm.weight': 1 + 0.1 * rng.standard_normal(D).astype(np.float32),
                m + 'eh_proj.weight': (0.05 * rng.standard_normal((D, 2 * D))).astype(np.float32),
                m + 'shared_head.norm.weight': 1 + 0.1 * rng.standard_normal(D).astype(np.float32),
                m + 'shared_head.head.weight': t['lm_head.weight'].copy(),
                m + 'embed_tokens.weight': t['model.embed_tokens.weight'].copy()})
  if damage:
    damage(extra, m)
  save_file(extra, str(d / 'mtp.safetensors'))
  return d


def test_checkpoint_without_mtp_tensors_imports_with_mtp_off_and_exports_bit_for_bit(tmp_path):
  """transformers drops the MTP layers: num_nextn_predict_layers stays in config.json, depth is 0."""
  checkpoints.import_hf(str(FIXTURE), str(tmp_path / 'w'))
  config = json.loads((tmp_path / 'w' / 'config.json').read_text())
  assert config['model']['mtp']['depth'] == 0
  checkpoints.export_hf(str(tmp_path / 'w'), str(tmp_path / 'hf'))
  a, b = tensors(FIXTURE), tensors(tmp_path / 'hf')
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  ca, cb = (json.loads((d / 'config.json').read_text()) for d in (FIXTURE, tmp_path / 'hf'))
  assert cb == ca


def test_hub_mtp_layers_import_into_the_modules_and_export_every_tensor_bit_for_bit(tmp_path):
  src = with_mtp(tmp_path)
  hf_t = tensors(src)
  w = tmp_path / 'w'
  checkpoints.import_hf(str(src), str(w))
  assert "c.model.mtp.depth = 1" in (w / 'experiment.py').read_text()
  config, _, state = sample.load(str(w))
  p, m = jax.device_get(state['params']), 'model.layers.3.'
  np.testing.assert_array_equal(p['mtp_blocks']['enorm'][0], hf_t[m + 'enorm.weight'])
  np.testing.assert_array_equal(p['mtp_blocks']['hnorm'][0], hf_t[m + 'hnorm.weight'])
  np.testing.assert_array_equal(p['mtp_blocks']['eh_proj'][0], hf_t[m + 'eh_proj.weight'].T)
  np.testing.assert_array_equal(p['mtp_blocks']['final_norm'][0], hf_t[m + 'shared_head.norm.weight'])
  np.testing.assert_array_equal(p['mtp_blocks']['block']['attn_norm'][0], hf_t[m + 'input_layernorm.weight'])
  np.testing.assert_array_equal(p['mtp_blocks']['block']['ffn']['router'][0], hf_t[m + 'mlp.gate.weight'].T)
  np.testing.assert_array_equal(jax.device_get(state['mtp_router_bias'])[0],
                                hf_t[m + 'mlp.gate.e_score_correction_bias'])
  # the decoder's logits are those of the model without the module (transformers' reference)
  checkpoints.logits(str(w), str(src / 'input_ids.npy'), str(tmp_path / 'logits.npy'))
  assert np.abs(np.load(tmp_path / 'logits.npy') - np.load(src / 'logits.npy')).max() < 1e-4
  checkpoints.export_hf(str(w), str(tmp_path / 'hf'))
  out = tensors(tmp_path / 'hf')
  assert sorted(out) == sorted(hf_t)
  for k in hf_t:
    assert out[k].dtype == hf_t[k].dtype and np.array_equal(out[k], hf_t[k]), k
  ca, cb = (json.loads((d / 'config.json').read_text()) for d in (src, tmp_path / 'hf'))
  assert cb == ca


def _head_differs(extra, m):
  extra[m + 'shared_head.head.weight'] = extra[m + 'shared_head.head.weight'] + 1.0


def _block_tensor_missing(extra, m):
  del extra[m + 'post_attention_layernorm.weight']


@pytest.mark.parametrize('damage,problem', [
    (_head_differs, 'tensor model.layers.3.shared_head.head.weight: differs from lm_head.weight'),
    (_block_tensor_missing, 'tensor model.layers.3.post_attention_layernorm.weight: missing'),
], ids=['head_copy_differs', 'block_tensor_missing'])
def test_bad_mtp_tensors_are_one_line_and_write_nothing(tmp_path, damage, problem):
  src = with_mtp(tmp_path, damage)
  with pytest.raises(ConvertError) as info:
    checkpoints.import_hf(str(src), str(tmp_path / 'w'))
  assert str(info.value).startswith(problem) and '\n' not in str(info.value), str(info.value)
  assert not (tmp_path / 'w').exists() and not list(tmp_path.glob('.w.*'))
