"""Time and peak host memory of `moejax.convert import` / `export` on a generated model of a few GB.

    python -m moejax.tools.bench_convert --out=docs/convert_perf.md [--gb=2] [--work=/tmp/bench_convert]

Writes a Qwen3-MoE-shaped model with random float32 weights tensor by tensor (sharded safetensors
and an index, as the hub stores them), then runs import, logits and export as subprocesses and
reads each one's peak resident memory (ru_maxrss of the child). Reported beside the model's size,
its largest tensor and its largest moejax leaf (one parameter stacked over the layers).
"""
import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags
import numpy as np

from moejax.tools import provenance

flags.DEFINE_string('out', 'docs/convert_perf.md', 'markdown file to write')
flags.DEFINE_float('gb', 2.0, 'approximate model size in GB (float32)')
flags.DEFINE_string('work', '/tmp/bench_convert', 'scratch directory (removed afterwards)')
flags.DEFINE_string('before', 'import 5.70 GiB = 5.18x a 1.10 GiB model, 91x its largest tensor (62.5 MiB), at 4db306c',
                    'the import figure measured before streaming, quoted in the output')
FLAGS = flags.FLAGS


def model_config(gb: float) -> dict:
  D, F, E, H, N = 512, 256, 64, 8, 64
  per_layer = 4 * (D * H * N) + E * 3 * D * F + E * D
  L = max(2, int(gb * 2 ** 30 / 4 / per_layer))
  return {'architectures': ['Qwen3MoeForCausalLM'], 'model_type': 'qwen3_moe', 'vocab_size': 32000,
          'hidden_size': D, 'num_hidden_layers': L, 'num_attention_heads': H, 'num_key_value_heads': H,
          'head_dim': N, 'intermediate_size': 4 * D, 'moe_intermediate_size': F, 'num_experts': E,
          'num_experts_per_tok': 4, 'norm_topk_prob': True, 'decoder_sparse_step': 1, 'mlp_only_layers': [],
          'rms_norm_eps': 1e-6, 'tie_word_embeddings': False, 'hidden_act': 'silu', 'dtype': 'float32',
          'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e6}, 'max_position_embeddings': 4096}


def tensor_shapes(c: dict):
  D, H, N, E, F, V = (c['hidden_size'], c['num_attention_heads'], c['head_dim'], c['num_experts'],
                      c['moe_intermediate_size'], c['vocab_size'])
  yield 'model.embed_tokens.weight', (V, D)
  for i in range(c['num_hidden_layers']):
    a = f'model.layers.{i}.self_attn.'
    yield from ((a + 'q_proj.weight', (H * N, D)), (a + 'k_proj.weight', (H * N, D)),
                (a + 'v_proj.weight', (H * N, D)), (a + 'o_proj.weight', (D, H * N)),
                (a + 'q_norm.weight', (N,)), (a + 'k_norm.weight', (N,)),
                (f'model.layers.{i}.input_layernorm.weight', (D,)),
                (f'model.layers.{i}.post_attention_layernorm.weight', (D,)),
                (f'model.layers.{i}.mlp.gate.weight', (E, D)))
    for e in range(E):
      m = f'model.layers.{i}.mlp.experts.{e}.'
      yield from ((m + 'gate_proj.weight', (F, D)), (m + 'up_proj.weight', (F, D)), (m + 'down_proj.weight', (D, F)))
  yield 'model.norm.weight', (D,)
  yield 'lm_head.weight', (V, D)


def generate(d: str, c: dict) -> dict:
  from moejax.convert.safetensors_io import write
  rng = np.random.default_rng(0)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, 'config.json'), 'w') as f:
    json.dump(c, f, indent=2)
  sizes = []

  def tensors():
    for name, shape in tensor_shapes(c):
      a = (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)
      sizes.append(a.nbytes)
      yield name, a
  write(d, tensors(), shard_bytes=512 * 2 ** 20)
  return {'bytes': sum(sizes), 'largest_tensor': max(sizes), 'tensors': len(sizes)}


def run(args: list[str]) -> tuple[float, int]:
  """(seconds, the child's own peak RSS in bytes) of `python -m moejax.convert args`."""
  code = ('import resource, runpy, sys\n'
          f'sys.argv = ["moejax.convert", *{args!r}]\n'
          'try:\n  runpy.run_module("moejax.convert", run_name="__main__")\n'
          'except SystemExit as e:\n  assert not e.code, e.code\n'
          'print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n')
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  if proc.returncode:
    raise SystemExit(proc.stderr[-2000:])
  kib = int(proc.stdout.split('PEAK_RSS_KIB')[-1].split()[0])
  return time.perf_counter() - start, kib * 1024


def main(argv):
  del argv
  cmd, commit = provenance.command('moejax.tools.bench_convert'), provenance.commit()
  work = FLAGS.work
  shutil.rmtree(work, ignore_errors=True)
  c = model_config(FLAGS.gb)
  start = time.perf_counter()
  info = generate(os.path.join(work, 'hf'), c)
  gen_s = time.perf_counter() - start
  L, E, D, F = c['num_hidden_layers'], c['num_experts'], c['hidden_size'], c['moe_intermediate_size']
  leaf = L * E * D * F * 4
  np.save(os.path.join(work, 'ids.npy'), np.arange(64, dtype=np.int64)[None] % c['vocab_size'])
  rows = []
  for label, args in (('import', ['import', f'--hf={work}/hf', f'--workdir={work}/w']),
                      ('logits', ['logits', f'--workdir={work}/w', f'--input_ids={work}/ids.npy',
                                  f'--out={work}/logits.npy']),
                      ('export', ['export', f'--workdir={work}/w', f'--hf={work}/out'])):
    s, rss = run(args)
    rows.append(f'| {label} | {s:.1f} | {rss / 2 ** 30:.2f} | {rss / info["bytes"]:.2f} | '
                f'{rss / info["largest_tensor"]:.1f} | {rss / leaf:.2f} |')
  gib = lambda n: f'{n / 2 ** 30:.2f} GiB'
  lines = ['# Checkpoint conversion: time and peak host memory', '', f'Command: `{cmd}`  ', f'Commit: `{commit}`', '',
           f'Model: Qwen3-MoE shape, {L} layers, d_model {D}, {E} experts of FFN {F}, vocab {c["vocab_size"]}, '
           f'float32: {info["tensors"]} tensors, {gib(info["bytes"])} in 512 MiB shards (generated in {gen_s:.0f} s). '
           f'Largest HF tensor {info["largest_tensor"] / 2 ** 20:.1f} MiB; largest moejax leaf (one expert '
           f'matrix stacked over layers and experts, [{L}, {E}, {D}, {F}]) {gib(leaf)}.', '',
           '| step | seconds | peak RSS (GiB) | / model size | / largest HF tensor | / largest moejax leaf |',
           '|---|---|---|---|---|---|', *rows, '',
           f'Before streaming: {FLAGS.before}.', '',
           'Import reads each HF tensor with pread (no memory map), assembles one moejax leaf, places it on',
           'its sharding and writes it (an orbax partial save) before the next, and writes no optimizer',
           'state: its peak is the JAX runtime plus a few copies of the largest leaf (the host leaf, its',
           'placed copy, the serializer\'s buffers), not a multiple of the model. A moejax leaf is stacked',
           'over the layers of its kind, so it is the largest tensor times the layers (and experts).',
           'Logits and export restore',
           'the whole checkpoint (export through sample.load, with the fresh optimizer state restore makes),',
           'which on the CPU backend lives in host memory; on an accelerator it is on the device.']
  with open(FLAGS.out, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
