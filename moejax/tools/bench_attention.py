"""Forward + backward time of one attention layer per type at several sequence lengths (CPU).

    python -m moejax.tools.bench_attention --out=docs/attention.md

Full softmax attention should scale ~4x per doubling of T at long T; SWA, NSA and KDA ~2x.
"""
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from moejax import configs, params
from moejax.attention import ATTENTIONS, AttentionConfig
from moejax.tools import provenance

flags.DEFINE_string('out', 'docs/attention.md', 'markdown file to write')
flags.DEFINE_list('types', ['gqa', 'mla', 'swa', 'nsa', 'kda'], 'attention types')
flags.DEFINE_list('seq_lens', ['1024', '2048', '4096'], 'sequence lengths')
flags.DEFINE_integer('repeats', 3, 'timed calls per point (median reported)')
FLAGS = flags.FLAGS


def bench_config():
  m = configs.base_config().model   # d_model 128, 4 heads of 32, 2 kv heads
  m.attn.window, m.kda.chunk = 128, 64
  m.nsa.update(block=32, stride=16, select_block=64, num_selected=4)
  return AttentionConfig.from_config(m)


def time_fwd_bwd(name, cfg, T, repeats):
  attn = ATTENTIONS[name]
  p = params.init_params(attn.specs(cfg), jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (1, T, cfg.d_model))
  step = jax.jit(jax.grad(lambda p, x: jnp.sum(attn.apply(p, x, cfg)[0] ** 2), argnums=(0, 1)))
  jax.block_until_ready(step(p, x))   # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(p, x))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  del argv
  commit = provenance.commit()   # before anything is written
  cfg = bench_config()
  lens = [int(t) for t in FLAGS.seq_lens]
  rows = []
  for name in FLAGS.types:
    ts = [time_fwd_bwd(name, cfg, T, FLAGS.repeats) for T in lens]
    ratio = ts[-1] / ts[-2] if len(ts) > 1 else float('nan')
    rows.append(f'| {name} | ' + ' | '.join(f'{t * 1e3:.1f}' for t in ts) + f' | {ratio:.2f} |')
    print(rows[-1], flush=True)
  head = ' | '.join(f't(T={T}) ms' for T in lens)
  text = '\n'.join([
      '# Attention types: forward + backward time vs sequence length (CPU)',
      '',
      f'Made by `make bench-attention` (`{provenance.command("moejax.tools.bench_attention")}`) at commit '
      f'{commit}, on {jax.devices()[0].platform} ({jax.device_count()} device(s)).',
      f'One layer, batch 1, d_model {cfg.d_model}, {cfg.num_heads} heads of {cfg.head_dim}, '
      f'{cfg.num_kv_heads} kv heads; swa window {cfg.window}; nsa l={cfg.nsa.block} d={cfg.nsa.stride} '
      f"l'={cfg.nsa.select_block} n={cfg.nsa.num_selected} window {cfg.window}; kda chunk {cfg.kda.chunk}. "
      f'Time of jit(grad) of sum(y^2) w.r.t. params and input, median of {FLAGS.repeats} calls after '
      'compiling. Full attention is O(T^2) (ratio -> 4 at long T); swa, nsa, kda are O(T) (ratio -> 2). '
      'The machine is shared, so absolute times are noisy.',
      '',
      f'| type | {head} | t({lens[-1]})/t({lens[-2]}) |',
      '|' + '---|' * (len(lens) + 2),
      *rows, ''])
  with open(FLAGS.out, 'w') as f:
    f.write(text)
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
