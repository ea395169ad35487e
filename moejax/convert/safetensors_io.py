"""Reading an HF model directory's tensors one at a time, and writing safetensors shards.

A directory holds model.safetensors, or shards listed by model.safetensors.index.json (or several
*.safetensors files). Tensors are read one by one with pread into a fresh buffer (not through a
memory map, whose touched pages would stay in the process's resident set), so reading costs one
tensor's memory; bfloat16 comes back as ml_dtypes.bfloat16.
"""
import json
import os
from pathlib import Path

import numpy as np

from moejax.convert.hf_config import ConvertError

SHARD_BYTES = 5 * 2 ** 30   # the hub's usual shard size


def _dtype(name: str):
  if name == 'BF16':
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype({'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64,
                   'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}[name])


def _header(path) -> tuple[dict, int]:
  """(the safetensors header {name: {dtype, shape, data_offsets}}, where the data starts)."""
  with open(path, 'rb') as f:
    n = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(n))
  header.pop('__metadata__', None)
  return header, 8 + n


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
      self.files[name] = (str(path),) + _header(path)
      del handle
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

  def shape(self, name: str) -> tuple[int, ...]:
    """From the file's header, without reading the tensor."""
    return tuple(self.files[self.where[name]][1][name]['shape'])

  def get(self, name: str) -> np.ndarray:
    if name not in self.where:
      raise ConvertError(f'tensor {name}: missing from the safetensors files')
    try:
      path, header, start = self.files[self.where[name]]
      info = header[name]
      begin, end = info['data_offsets']
      out = np.empty(info['shape'], _dtype(info['dtype']))
      if out.nbytes != end - begin:
        raise ValueError(f'{end - begin} bytes for shape {info["shape"]} {info["dtype"]}')
      buf = memoryview(out.reshape(-1).view(np.uint8))
      fd = os.open(path, os.O_RDONLY)
      try:
        done = 0
        while done < len(buf):
          got = os.preadv(fd, [buf[done:]], start + begin + done)
          if got <= 0:
            raise ValueError('file ends inside the tensor')
          done += got
      finally:
        os.close(fd)
      return out
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
