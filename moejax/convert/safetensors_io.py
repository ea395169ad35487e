"""Reading an HF model directory's tensors one at a time, and writing safetensors shards.

A directory holds model.safetensors, or shards listed by model.safetensors.index.json (or several
*.safetensors files). Tensors are memory-mapped and read one by one, so reading costs one tensor's
memory; bfloat16 comes back as ml_dtypes.bfloat16.
"""
import json
import os
from pathlib import Path

import numpy as np

from moejax.convert.hf_config import ConvertError

SHARD_BYTES = 5 * 2 ** 30   # the hub's usual shard size


class Tensors:
  """name -> array of an HF directory's safetensors files (opened lazily, read on demand)."""

  def __init__(self, hf_dir: str):
    from safetensors import safe_open
    d = Path(hf_dir)
    index = d / 'model.safetensors.index.json'
    if index.is_file():
      weight_map = json.loads(index.read_text())['weight_map']
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in d.glob('*.safetensors'))
      if not files:
        raise ConvertError(f'{d}: no *.safetensors files')
      weight_map = None
    self.files, self.where = {}, {}
    for name in files:
      path = d / name
      try:
        handle = safe_open(str(path), framework='numpy')
        keys = list(handle.keys())
      except Exception as e:   # a truncated or corrupt file: safetensors' own message, one line
        raise ConvertError(f'{path}: not a readable safetensors file ({str(e).splitlines()[0]})') from None
      self.files[name] = handle
      for k in keys:
        self.where[k] = name
    if weight_map is not None:
      missing = sorted(k for k, f in weight_map.items() if self.where.get(k) != f)
      if missing:
        raise ConvertError(f'{index}: {missing[0]} is not in {weight_map[missing[0]]}')

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def names(self) -> list[str]:
    return sorted(self.where)

  def get(self, name: str) -> np.ndarray:
    if name not in self.where:
      raise ConvertError(f'tensor {name}: missing from the safetensors files')
    try:
      return self.files[self.where[name]].get_tensor(name)
    except Exception as e:
      raise ConvertError(f'{self.where[name]}: tensor {name} unreadable ({str(e).splitlines()[0]})') from None


def write(out_dir: str, tensors, shard_bytes: int = SHARD_BYTES):
  """Writes (name, array) pairs into model.safetensors, or model-0000k-of-0000n.safetensors shards
  with an index past shard_bytes. Arrays are consumed one shard at a time."""
  from safetensors.numpy import save_file
  shards, current, size = [], {}, 0
  for name, a in tensors:
    if current and size + a.nbytes > shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = np.ascontiguousarray(a)
    size += a.nbytes
  shards.append(current)
  os.makedirs(out_dir, exist_ok=True)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
    return
  weight_map, total = {}, 0
  for k, shard in enumerate(shards, 1):
    fname = f'model-{k:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, os.path.join(out_dir, fname), metadata={'format': 'pt'})
    for name, a in shard.items():
      weight_map[name] = fname
      total += a.nbytes
  with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
