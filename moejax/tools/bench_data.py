"""Benchmark of `python -m moejax.data.prepare` behind `make bench-data` (docs/data_perf.md): stage
throughput against the `tokenizers` library's own encode_batch, worker scaling, peak memory per
process at two input sizes, and MinHash quality on a seeded corpus with planted duplicates.

python -m moejax.tools.bench_data --out=docs/data_perf.md [--mb=1000] [--small_mb=100] [--workers=2]

Every prepare run is the real CLI (`python -m moejax.data.prepare ...`) in a child process, whose
stages are timed one by one: the child runs prepare.main() with `executors.chain` wrapped so that
the stages (datatrove executors, unchanged) run in order with a clock read between them; it also
keeps the dedup removal lists (remove/*.remove) before prepare deletes its work folder, to score
MinHash per planted duplicate. Memory: the parent samples VmHWM (the kernel's peak RSS of a
process) of every process in the child's tree every 0.2 s. The tokenizer is trained once by
prepare on a small sample; the timed runs reuse it with --tokenizer=, so no training is in them.

Throughputs are MB (2^20 bytes) of document text (UTF-8, as generated) per second of wall time; the
JSONL files are about 1% larger. All runs of one report are on one machine, one after another.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from moejax.tools import corpus, provenance

MB = 2 ** 20
STAGES = ('tokenize', 'dedup_buckets', 'dedup_clusters', 'write_shards', 'manifest')
TARGETS = {'ratio_exact': 0.7, 'rss_growth': 1.2, 'rss_cap_gb': 2.0, 'near_found': 95.0,
           'distinct_removed': 1.0}


# ---------------------------------------------------------------- child: one timed prepare run

def _child(stats_path: str, argv: list[str]) -> int:
  """prepare.main(argv) with its stages timed; writes {stages: {name: s}, removed: {task: [...]}}."""
  from moejax.data import executors, prepare
  real_chain = executors.chain
  record = {'stages': {}, 'removed': {}}

  class TimedChain:
    """Runs the chain's executors one after another (what `depends=` does on a local machine),
    reading the clock between them."""

    def __init__(self, stages, work, opts):
      self.stages, self.work = stages, work
      self.execs, e = [], real_chain(stages, work, opts)
      while e is not None:
        self.execs.append(e)
        e = e.depends
      self.execs.reverse()

    def run(self):
      t = time.perf_counter()
      for s, e in zip(self.stages, self.execs):
        e.depends = None   # already run just before
        e.run()
        now = time.perf_counter()
        record['stages'][s.name] = now - t
        t = now
      rm = Path(self.work) / 'remove'
      for f in sorted(rm.glob('*.remove')) if rm.is_dir() else ():
        record['removed'][int(f.stem)] = np.fromfile(f, dtype='<u4').tolist()

  executors.chain = TimedChain
  rc = prepare.main(argv)
  Path(stats_path).write_text(json.dumps(record))
  return rc


# ---------------------------------------------------------------- parent: runs and measurements

def _vm_hwm_kb(pid: int) -> int:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def run_prepare(raw: str, out: str, tmp: str, **flags) -> dict:
  """One prepare CLI run in a child; wall time, stage times, removals, manifest and peak RSS
  (MiB) of the driver and of the other processes of its tree (pool workers, forkserver, manager)."""
  import psutil
  stats_path = f'{tmp}/stats-{time.monotonic_ns()}.json'
  argv = [f'--raw={raw}', f'--out={out}', *(f'--{k}={v}' for k, v in flags.items())]
  cmd = [sys.executable, '-m', 'moejax.tools.bench_data', '--child', stats_path, '--', *argv]
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [provenance.REPO,
                                                                    os.environ.get('PYTHONPATH')]))}
  env.pop('TOKENIZERS_PARALLELISM', None)   # prepare sets it itself (off when workers > 1)
  shutil.rmtree(out, ignore_errors=True)
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  peaks: dict[int, int] = {}
  done = threading.Event()

  def sample():
    root = psutil.Process(proc.pid)
    while not done.is_set():
      try:
        procs = [root, *root.children(recursive=True)]
      except psutil.Error:
        procs = [root]
      for p in procs:
        kb = _vm_hwm_kb(p.pid)
        peaks[p.pid] = max(peaks.get(p.pid, 0), kb)
      done.wait(0.2)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  try:
    stdout, stderr = proc.communicate()
  except BaseException:   # e.g. Ctrl-C: take the run's whole process tree down with us
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
      p.kill()
    raise
  finally:
    done.set()
  wall = time.perf_counter() - start
  sampler.join()
  if proc.returncode != 0:
    raise RuntimeError(f'prepare {" ".join(argv)} failed ({proc.returncode}):\n{stdout}\n{stderr}')
  stats = json.loads(Path(stats_path).read_text())
  manifest = json.loads((Path(out) / 'manifest.json').read_text())
  others = [kb for pid, kb in peaks.items() if pid != proc.pid]
  return {'wall': wall, 'stages': stats['stages'],
          'removed': {int(k): v for k, v in stats['removed'].items()}, 'manifest': manifest,
          'message': stdout.strip(), 'rss_driver': peaks.get(proc.pid, 0) / 1024,
          'rss_others': max(others, default=0) / 1024, 'processes': len(peaks)}


def anchor(tokenizer_json: str, raw_dir: str, max_mb: float) -> dict:
  """tokenizers' own Tokenizer.encode_batch (its thread pool on every core) over the corpus' texts
  (the first max_mb MB, in file order), batches of 4M characters like prepare's; only the
  encode_batch calls are timed."""
  import orjson
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(tokenizer_json)
  budget, nbytes, secs, ntok = max_mb * MB, 0, 0.0, 0

  def batches():
    nonlocal budget
    batch, chars = [], 0
    for f in sorted(Path(raw_dir).glob('*.jsonl')):
      with open(f, 'rb') as fh:
        for line in fh:
          if budget <= 0:
            break
          text = orjson.loads(line)['text']
          budget -= len(text.encode())
          batch.append(text)
          chars += len(text)
          if chars >= 4 << 20:
            yield batch
            batch, chars = [], 0
    if batch:
      yield batch

  for batch in batches():
    t = time.perf_counter()
    enc = tok.encode_batch(batch)
    secs += time.perf_counter() - t
    nbytes += sum(len(s.encode()) for s in batch)
    ntok += sum(len(e.ids) for e in enc)
  return {'mb': nbytes / MB, 'seconds': secs, 'mbps': nbytes / MB / secs, 'tokens': ntok}


def quality(run: dict, info: dict) -> dict:
  """MinHash (or exact) removals scored per planted duplicate group (a distinct document and its
  copies: a perfect dedup keeps exactly one of each group), and from the manifest's counts."""
  groups = np.load(info['groups'])
  files = sorted(Path(info['dir']).glob('*.jsonl'))
  lines = [sum(1 for _ in open(f, 'rb')) for f in files]
  offsets = np.concatenate([[0], np.cumsum(lines)])
  removed = np.zeros(len(groups), bool)
  for t, idx in run['removed'].items():
    removed[offsets[t] + np.asarray(idx, np.int64)] = True
  kept_per_group = np.bincount(groups[~removed], minlength=len(groups))
  size_per_group = np.bincount(groups, minlength=len(groups))
  is_group = size_per_group > 0
  missed = int(np.maximum(kept_per_group[is_group] - 1, 0).sum())   # copies kept beside another
  lost = int((kept_per_group[is_group] == 0).sum())                  # groups with nothing kept
  m = run['manifest']
  kept = sum(s['num_docs'] for s in m['splits'].values())
  return {'removed': int(removed.sum()), 'manifest_removed': m['duplicate_docs_removed'],
          'kept': kept, 'expected_kept': info['distinct'], 'missed': missed, 'lost': lost,
          'near_found': 100.0 * (1 - missed / info['near']) if info['near'] else float('nan'),
          'distinct_removed': 100.0 * lost / info['distinct'],
          'count_near_found': 100.0 * min(info['near'], max(0, info['documents'] - kept - info['exact']))
                              / max(info['near'], 1),
          'count_distinct_removed': 100.0 * max(0, info['distinct'] - kept) / info['distinct']}


# ---------------------------------------------------------------- report

def _fmt_s(s):
  return f'{s:.1f}'


def _row(*cells) -> str:
  return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def report(ns, cmd, commit, info, tok_run, anchors, runs, quals) -> str:
  big, small = info['large'], info['small']
  w = ns.workers
  out = ['# Data pipeline benchmark (moejax.data.prepare)', '',
         f'Command: `{cmd}`  ', f'Commit: `{commit}`  ',
         f'Machine: {platform.node()}, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), '
         f'Python {platform.python_version()}  ',
         f'Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  ',
         f'Sizes: --mb={ns.mb:g} --small_mb={ns.small_mb:g} --workers={w}', '',
         'Each prepare figure is one run of the CLI (`python -m moejax.data.prepare --raw=CORPUS '
         '--out=... --tokenizer=TOK --dedup=D --workers=N`, no filters), timed stage by stage by '
         'moejax.tools.bench_data (see its docstring); MB/s is MB (2^20 bytes) of document text '
         'per second of wall time. The machine may be shared: compare figures within this file.', '',
         '## Corpora (moejax.tools.corpus, seed 1234)', '',
         _row('corpus', 'text MB', 'JSONL MB', 'files', 'documents', 'distinct', 'exact copies',
              'near copies'),
         _row(*['---'] * 8)]
  for name, c in (('large', big), ('small', small)):
    out.append(_row(name, f"{c['text_bytes'] / MB:.1f}", f"{c['bytes'] / MB:.1f}", c['files'],
                    c['documents'], c['distinct'], c['exact'], c['near']))
  out += ['', f"Tokenizer: byte-level BPE, vocab {ns.vocab_size}, trained once by prepare on "
          f"{min(ns.tokenizer_mb, small['text_bytes'] / MB):.1f} MB of the small corpus' text (the first, "
          f"in file order) in {tok_run['stages'].get('tokenizer', 0):.1f} s "
          f"(its `tokenizer` stage; {tok_run['wall']:.1f} s for the whole CLI run); not part of any "
          'timed run below.', '',
          '## Anchor: tokenizers encode_batch', '',
          _row('text', 'MB', 'seconds', 'MB/s', 'tokens/s'), _row(*['---'] * 5)]
  for name, a in anchors.items():
    out.append(_row(f'large corpus, first {a["mb"]:.0f} MB, {name} the prepare runs', f"{a['mb']:.1f}", _fmt_s(a['seconds']),
                    f"{a['mbps']:.2f}", f"{a['tokens'] / a['seconds']:,.0f}"))
  out += ['', f'`tokenizers.Tokenizer.encode_batch` on the same texts, with its own thread pool on '
          f'all {os.cpu_count()} cores; only the calls are timed (no reading or parsing). Measured before '
          'and after the prepare runs; the ratios below divide by the faster of the two (the '
          'conservative choice on a shared machine).', '',
          '## Stage throughput', '',
          _row('run', 'text MB', *[f'{s} s (MB/s)' for s in STAGES], 'end-to-end s', 'end-to-end MB/s',
               'vs anchor'), _row(*['---'] * (len(STAGES) + 5))]
  a_ref = max(a['mbps'] for a in anchors.values())
  for key, r in runs.items():
    c = info[r['corpus']]
    mb = c['text_bytes'] / MB
    cells = []
    for s in STAGES:
      t = r['stages'].get(s)
      cells.append('-' if t is None else f'{t:.1f} ({mb / t:.1f})')
    out.append(_row(key, f'{mb:.0f}', *cells, _fmt_s(r['wall']), f"{mb / r['wall']:.2f}",
                    f"{mb / r['wall'] / a_ref:.2f}x"))
  out += ['', 'Stage seconds are wall time of each datatrove stage as the driver sees it (pool '
          'start-up included); end-to-end is the whole CLI run (interpreter start, input checks, '
          'fingerprinting, every stage, moving the result into place). "vs anchor" divides by the '
          'faster anchor.'
          + ('' if f'large minhash w={w}' in runs else
             f' --dedup=minhash ran on the small corpus only (--minhash_mb={ns.minhash_mb:g} < --mb).'),
          '',
          '## Scaling (large corpus, --dedup=exact)', '',
          _row('workers', 'end-to-end s', 'MB/s', 'speedup'), _row(*['---'] * 4)]
  r1, rw = runs[f'large exact w=1'], runs[f'large exact w={w}']
  mb = big['text_bytes'] / MB
  out.append(_row(1, _fmt_s(r1['wall']), f"{mb / r1['wall']:.2f}", '1.00x'))
  if w != 1:
    out.append(_row(w, _fmt_s(rw['wall']), f"{mb / rw['wall']:.2f}", f"{r1['wall'] / rw['wall']:.2f}x"))
  out += ['', 'With --workers=1 the one task runs in the prepare process, where prepare leaves '
          "tokenizers' own thread pool on (it turns it off only for more workers), so the 1-worker "
          'run already uses every core while encoding; the speedup is what the task processes add '
          'beyond that.', '', '## Peak memory', '',
          _row('run', 'driver peak RSS MiB', 'peak RSS of the other processes MiB (max)', 'processes seen'),
          _row(*['---'] * 4)]
  for key, r in runs.items():
    out.append(_row(key, f"{r['rss_driver']:.0f}", f"{r['rss_others']:.0f}", r['processes']))
  out += ['', 'VmHWM (peak resident set) from /proc of every process in the run\'s tree, sampled '
          'every 0.2 s. With --workers=1 the tasks run in the driver; with more, in the pool '
          'workers (the other processes also include the forkserver and the manager, which are '
          'small), so the per-worker figure is the driver\'s at w=1 and the others\' maximum '
          'otherwise.', '', '## Deduplication quality', '',
          _row('run', 'removed', 'kept docs', 'expected kept (distinct)', 'copies kept beside another',
               'groups with nothing kept', 'near copies found %', 'distinct removed %'),
          _row(*['---'] * 8)]
  for key, q in quals.items():
    out.append(_row(key, q['removed'], q['kept'], q['expected_kept'], q['missed'], q['lost'],
                    f"{q['near_found']:.2f}", f"{q['distinct_removed']:.3f}"))
  out += ['', 'A group is a distinct document and its planted copies; a perfect deduplication keeps '
          'exactly one document of each (either one). "Copies kept beside another" counts documents '
          'kept in a group that already kept one (missed duplicates; exact copies are caught by '
          'construction, so these are near copies): near copies found = 1 - missed / near copies. '
          '"Groups with nothing kept" are distinct contents lost to false matches: distinct removed '
          '= lost / distinct. Removals come from the dedup removal lists of the run and '
          + ('agree with' if all(q['removed'] == q['manifest_removed'] for q in quals.values())
             else '**do not agree** with') +
          " the manifest's duplicate_docs_removed. Exact dedup is expected to remove the exact "
          "copies only. From the manifest's counts alone (kept = splits' num_docs, expected kept = "
          'distinct):']
  for key, q in quals.items():
    out.append(f"- {key}: kept {q['kept']} of {q['kept'] + q['manifest_removed']} (expected "
               f"{q['expected_kept']}): near copies found {q['count_near_found']:.2f}%, distinct "
               f"removed at least {q['count_distinct_removed']:.3f}%")
  # targets
  ratio = mb / rw['wall'] / a_ref
  per_worker = lambda r: r['rss_driver'] if w == 1 else r['rss_others']
  rss_small, rss_big = per_worker(runs[f'small exact w={w}']), per_worker(rw)
  qm = quals.get(f'large minhash w={w}') or quals[f'small minhash w={w}']
  qkey = 'large' if f'large minhash w={w}' in quals else 'small'
  met = lambda ok: 'met' if ok else 'NOT met'
  out += ['', '## Targets', '',
          f"- End-to-end --dedup=exact (large, {w} workers) >= {TARGETS['ratio_exact']}x the anchor: "
          f"{met(ratio >= TARGETS['ratio_exact'])} ({mb / rw['wall']:.2f} MB/s vs {a_ref:.2f} MB/s = {ratio:.2f}x)",
          f"- Peak RSS per worker at the large size <= {TARGETS['rss_growth']}x the small size's: "
          f"{met(rss_big <= TARGETS['rss_growth'] * rss_small)} ({rss_big:.0f} MiB vs {rss_small:.0f} MiB "
          f"= {rss_big / max(rss_small, 1e-9):.2f}x)",
          f"- Peak RSS per worker < {TARGETS['rss_cap_gb']:g} GB: "
          f"{met(max(rss_big, rss_small) * 2**20 < TARGETS['rss_cap_gb'] * 1e9)} "
          f"({max(rss_big, rss_small):.0f} MiB)",
          f"- MinHash finds >= {TARGETS['near_found']:g}% of planted near duplicates ({qkey} corpus): "
          f"{met(qm['near_found'] >= TARGETS['near_found'])} ({qm['near_found']:.2f}%)",
          f"- MinHash removes <= {TARGETS['distinct_removed']:g}% of distinct documents ({qkey} corpus): "
          f"{met(qm['distinct_removed'] <= TARGETS['distinct_removed'])} ({qm['distinct_removed']:.3f}%)",
          '']
  return '\n'.join(out)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ['--child']:
    return _child(argv[1], argv[3:] if argv[2:3] == ['--'] else argv[2:])
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', required=True, help='the report (markdown)')
  p.add_argument('--mb', type=float, default=1000, help='MB of JSONL in the large corpus')
  p.add_argument('--small_mb', type=float, default=100, help='MB of JSONL in the small corpus')
  p.add_argument('--workers', type=int, default=2, help='prepare --workers of the main runs')
  p.add_argument('--files', type=int, default=8, help='JSONL files per corpus (tasks of the tokenize stage)')
  p.add_argument('--minhash_mb', type=float, default=None,
                 help='run --dedup=minhash on the large corpus only if it is at most this many MB '
                      '(default: always); otherwise on the small one only')
  p.add_argument('--vocab_size', type=int, default=4096)
  p.add_argument('--tokenizer_mb', type=float, default=16, help='BPE training sample')
  p.add_argument('--anchor_mb', type=float, default=100, help='at most this much text for the anchor')
  p.add_argument('--work', default=None, help='scratch folder (default: a temporary one, removed)')
  ns = p.parse_args(argv)
  cmd, commit = provenance.command('moejax.tools.bench_data', argv), provenance.commit()
  tmp = ns.work or tempfile.mkdtemp(prefix='bench_data-')
  Path(tmp).mkdir(parents=True, exist_ok=True)
  log = lambda m: print(f'[{time.strftime("%H:%M:%S")}] {m}', flush=True)
  try:
    info = {}
    for name, mb in (('small', ns.small_mb), ('large', ns.mb)):
      shutil.rmtree(f'{tmp}/{name}', ignore_errors=True)
      info[name] = {**corpus.make(f'{tmp}/{name}', mb, ns.files), 'dir': f'{tmp}/{name}'}
      log(f'corpus {name}: {info[name]}')
    tok_run = run_prepare(info['small']['dir'], f'{tmp}/tok', tmp, vocab_size=ns.vocab_size,
                          tokenizer_sample_mb=ns.tokenizer_mb, dedup='none', workers=1)
    tok = f'{tmp}/tok'
    log(f'tokenizer: {tok_run["message"]}')
    anchors = {'before': anchor(f'{tok}/tokenizer.json', info['large']['dir'], ns.anchor_mb)}
    log(f'anchor: {anchors}')
    w = ns.workers
    plan = [('small', 'exact', w), ('small', 'minhash', w), ('large', 'exact', w)]
    if ns.minhash_mb is None or ns.mb <= ns.minhash_mb:
      plan.append(('large', 'minhash', w))
    if w != 1:
      plan.append(('large', 'exact', 1))
    runs = {}
    for name, dedup, workers in plan:
      key = f'{name} {dedup} w={workers}'
      r = run_prepare(info[name]['dir'], f'{tmp}/out', tmp, tokenizer=tok, dedup=dedup, workers=workers)
      r['corpus'] = name
      runs[key] = r
      log(f'{key}: {r["wall"]:.1f}s {r["stages"]} rss {r["rss_driver"]:.0f}/{r["rss_others"]:.0f} MiB')
    anchors['after'] = anchor(f'{tok}/tokenizer.json', info['large']['dir'], ns.anchor_mb)
    log(f'anchor: {anchors}')
    quals = {k: quality(r, info[r['corpus']]) for k, r in runs.items() if ' w=1' not in k or w == 1}
    text = report(ns, cmd, commit, info, tok_run, anchors, runs, quals)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(text)
    log(f'wrote {ns.out}')
  finally:
    if ns.work is None:
      shutil.rmtree(tmp, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
