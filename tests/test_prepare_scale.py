"""moejax.data.prepare at scale: sharded output, exact and MinHash dedup, inputs anywhere (gz/zst/
parquet, fsspec URLs), filters, bad input, resuming a killed run byte for byte, the Slurm executor
(run here through a stand-in sbatch), and training over the shards."""
import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moejax.data import pipeline, prepare, shards

ROOT = Path(__file__).resolve().parent.parent
SYLLABLES = ['ka', 'lo', 'mi', 'ne', 'ru', 'ta', 'vo', 'shi', 'en', 'de', 'ar', 'po', 'li', 'um']


def make_corpus(out: Path, num_docs: int, files: int = 3, seed: int = 0) -> dict:
  """JSONL files of distinct random documents plus planted exact and near (1 word in 100 changed)
  duplicates of earlier ones; returns the counts."""
  rng = random.Random(seed)
  words = sorted({''.join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(3000)})
  out.mkdir(parents=True, exist_ok=True)
  recs, distinct, counts = [], [], {'distinct': 0, 'exact': 0, 'near': 0}
  for n in range(num_docs):
    r = rng.random()
    if distinct and r < 0.1:
      text = rng.choice(distinct)
      counts['exact'] += 1
    elif distinct and r < 0.2:
      w = rng.choice(distinct).split(' ')
      for j in rng.sample(range(len(w)), max(1, len(w) // 100)):
        w[j] = rng.choice(words)
      text = ' '.join(w)
      counts['near'] += 1
    else:
      text = ' '.join(rng.choice(words) for _ in range(rng.randint(150, 400))) + '.'
      distinct.append(text)
      counts['distinct'] += 1
    recs.append({'id': f'doc{n}', 'text': text})
  for i in range(files):
    with open(out / f'part-{i}.jsonl', 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in recs[i::files])
  return counts


def run(*args) -> int:
  return prepare.main(['--workers=1', *map(str, args)])


def npy_hashes(d: Path) -> dict:
  return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(d.rglob('*.npy'))}


def num_docs(d) -> int:
  m = shards.load_manifest(str(d))
  return sum(s['num_docs'] for s in m['splits'].values())


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('scale')
  counts = make_corpus(root / 'raw', 300)
  assert run(f"--raw={root / 'raw'}/*.jsonl", f"--out={root / 'tok'}", '--vocab_size=400',
             '--shard_tokens=20000') == 0
  return {'root': root, 'raw': f"{root / 'raw'}/*.jsonl", 'tok': root / 'tok', **counts}


def test_exact_dedup_removes_exact_copies_and_shards_hold_whole_documents(corpus):
  m = shards.load_manifest(str(corpus['tok']))
  assert m['dedup'] == {'method': 'exact', 'docs_removed': corpus['exact']}
  assert num_docs(corpus['tok']) == corpus['distinct'] + corpus['near']
  train = m['splits']['train']
  assert len(train['shards']) >= 4 and all(s['name'].startswith('train/') for s in train['shards'])
  for s in train['shards'][:-1]:   # cut after the document that reaches shard_tokens
    first_doc_len = np.diff(np.load(corpus['tok'] / f"{s['name']}.docs.npy"))[-1]
    assert 20000 <= s['num_tokens'] < 20000 + first_doc_len + 1
  entries = shards.split_entries(str(corpus['tok']), 'train')
  assert len(entries) == train['num_docs'] and all(e[-1] == m['eod_id'] for e in entries)
  assert sum(len(e) for e in entries) == train['num_tokens']


def test_minhash_removes_planted_near_duplicates_before_the_split(corpus, tmp_path):
  out = tmp_path / 'mh'
  assert run(f"--raw={corpus['raw']}", f'--out={out}', f"--tokenizer={corpus['tok']}",
             '--dedup=minhash', '--shard_tokens=20000') == 0
  assert num_docs(out) == corpus['distinct']   # every copy gone, every distinct doc kept
  tok = shards.load_tokenizer(str(out))
  texts = {split: {tok.decode(e[:-1].tolist()) for e in shards.split_entries(str(out), split)}
           for split in ('train', 'val')}
  assert texts['val'] and not texts['train'] & texts['val']


def test_training_batches_read_the_shards(corpus):
  ds = pipeline.train_dataset(str(corpus['tok']), seq_len=64, batch_size=4, seed=0)
  b = ds[len(ds) - 1]
  assert b['inputs'].shape == (4, 64) and (b['targets'][:, :-1] == b['inputs'][:, 1:]).all()


def test_a_given_tokenizer_and_the_same_inputs_are_up_to_date_then_a_change_reprepares(corpus, tmp_path, capsys):
  out = tmp_path / 'o'
  args = (f"--raw={corpus['raw']}", f'--out={out}', f"--tokenizer={corpus['tok']}")
  assert run(*args) == 0
  capsys.readouterr()
  assert run(*args) == 0 and capsys.readouterr().out == f'prepared data up to date: {out}\n'
  assert run(*args, '--shard_tokens=5000') == 0 and 'up to date' not in capsys.readouterr().out
  assert len(shards.load_manifest(str(out))['splits']['train']['shards']) > 8


def test_compressed_parquet_and_url_inputs_give_the_same_documents(corpus, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  src = sorted(Path(corpus['raw']).parent.glob('*.jsonl'))
  recs = [json.loads(l) for p in src for l in p.read_text().splitlines()]
  d = tmp_path / 'mixed'
  d.mkdir()
  lines = ''.join(json.dumps({'body': r['text'], 'key': r['id']}) + '\n' for r in recs[:100])
  (d / 'a.jsonl.gz').write_bytes(gzip.compress(lines.encode()))
  (d / 'b.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(
      ''.join(json.dumps({'body': r['text'], 'key': r['id']}) + '\n' for r in recs[100:200]).encode()))
  pq.write_table(pa.table({'body': [r['text'] for r in recs[200:]], 'key': [r['id'] for r in recs[200:]]}),
                 d / 'c.parquet')
  outs = {}
  for name, raw in (('local', d), ('file_url', f'file://{d}')):
    outs[name] = tmp_path / name
    assert run(f'--raw={raw}', f'--out={outs[name]}', f"--tokenizer={corpus['tok']}",
               '--text_field=body', '--id_field=key', '--shard_tokens=20000') == 0
  one = tmp_path / 'one'
  assert run(f"--raw={corpus['raw']}", f'--out={one}', f"--tokenizer={corpus['tok']}", '--shard_tokens=20000') == 0
  # the same records (other files, same ids): the same documents, split the same way
  for out in outs.values():
    for split in ('train', 'val'):
      assert (sorted(map(bytes, shards.split_entries(str(out), split)))
              == sorted(map(bytes, shards.split_entries(str(one), split))))


def test_memory_filesystem_input_and_output(corpus):
  import fsspec
  fs = fsspec.filesystem('memory')
  for p in sorted(Path(corpus['raw']).parent.glob('*.jsonl')):
    fs.pipe(f'/in/{p.name}', p.read_bytes())
  assert run('--raw=memory://in/*.jsonl', '--out=memory://prepared', f"--tokenizer={corpus['tok']}") == 0
  m = json.loads(fs.cat('/prepared/manifest.json'))
  assert sum(s['num_docs'] for s in m['splits'].values()) == corpus['distinct'] + corpus['near']
  assert fs.exists(f"/prepared/{m['splits']['train']['shards'][0]['name']}.tokens.npy")
  assert not [p for p in fs.ls('/', detail=False) if '.prepared.prepare-' in p]


def test_filters_drop_and_count_by_name(corpus, tmp_path):
  raw = tmp_path / 'f.jsonl'
  good = [json.loads(l) for l in Path(sorted(Path(corpus['raw']).parent.glob('*.jsonl'))[0]).read_text().splitlines()[:20]]
  junk = [{'id': f'junk{i}', 'text': 'buy now\n' * 40} for i in range(5)]   # repeated lines
  raw.write_text(''.join(json.dumps(r) + '\n' for r in good + junk))
  out = tmp_path / 'fo'
  assert run(f'--raw={raw}', f'--out={out}', f"--tokenizer={corpus['tok']}", '--filters=gopher_repetition') == 0
  m = shards.load_manifest(str(out))
  assert m['filters']['gopher_repetition']['dropped'] >= 5
  tok = shards.load_tokenizer(str(out))
  kept = [tok.decode(e[:-1].tolist()) for s in ('train', 'val') for e in shards.split_entries(str(out), s)]
  assert not [t for t in kept if t.startswith('buy now')]


def _err(capsys, *args) -> str:
  assert run(*args) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1, err
  return err


def test_bad_input_is_one_line_naming_the_file_and_keeps_the_prepared_dir(corpus, tmp_path, capsys):
  import pyarrow as pa
  import pyarrow.parquet as pq
  out = tmp_path / 'keep'
  assert run(f"--raw={corpus['raw']}", f'--out={out}', f"--tokenizer={corpus['tok']}") == 0
  before = npy_hashes(out)
  capsys.readouterr()
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"id": 1, "text": "fine words here"}\n{"id": 2, "text": oops}\n{"id": 3, "text": "more words"}\n')
  no_text = tmp_path / 'notext.parquet'
  pq.write_table(pa.table({'body': ['x']}), no_text)
  broken = tmp_path / 'broken.jsonl.gz'
  broken.write_bytes(b'\x1f\x8b\x08\x00garbage')
  tok = f"--tokenizer={corpus['tok']}"
  assert f'{bad}:2: not JSON' in _err(capsys, f'--raw={bad}', f'--out={out}', tok)
  assert f"{no_text}: no column 'text'" in _err(capsys, f'--raw={no_text}', f'--out={out}', tok)
  assert f'{broken}: unreadable' in _err(capsys, f'--raw={broken}', f'--out={out}', tok)
  assert 'memory://nowhere/x.jsonl: no such file' in _err(capsys, '--raw=memory://nowhere/x.jsonl', f'--out={out}', tok)
  assert npy_hashes(out) == before
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]   # no work folder left
  # skipping malformed records instead: counted in the manifest
  assert run(f'--raw={bad}', f'--raw={corpus["raw"]}', f"--out={tmp_path / 'skip'}", tok,
             '--bad_records=skip') == 0
  assert shards.load_manifest(str(tmp_path / 'skip'))['bad_records_skipped'] == 1


def test_a_prepared_dir_whose_tokenizer_was_replaced_is_refused_as_tokenizer(corpus, tmp_path, capsys):
  import shutil
  d = tmp_path / 'edited'
  shutil.copytree(corpus['tok'], d)
  j = json.loads((d / 'tokenizer.json').read_text())
  j['model']['merges'] = j['model']['merges'][:-1]
  (d / 'tokenizer.json').write_text(json.dumps(j))
  err = _err(capsys, f"--raw={corpus['raw']}", f"--out={tmp_path / 'x'}", f'--tokenizer={d}')
  assert f'--tokenizer {d}: its tokenizer file does not match' in err


def _cli(*args, env=None):
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu', **(env or {})}
  return subprocess.Popen([sys.executable, '-m', 'moejax.data.prepare', *map(str, args)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow   # a killed and resumed prepare (~10 s); the corpus acceptance check covers it
def test_kill_9_mid_run_then_the_same_command_gives_identical_shards(corpus, tmp_path):
  common = (f"--raw={corpus['raw']}", f"--tokenizer={corpus['tok']}", '--dedup=minhash',
            '--shard_tokens=20000', '--workers=2')
  ref = tmp_path / 'ref'
  assert _cli(*common, f'--out={ref}').wait(300) == 0
  out = tmp_path / 'killed'
  proc = _cli(*common, f'--out={out}')
  deadline = time.time() + 120   # kill the whole group once the first task has completed
  while not list(tmp_path.glob('.killed.prepare-*/logs/tokenize/completions/*')) and time.time() < deadline:
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  [work] = tmp_path.glob('.killed.prepare-*')
  assert not out.exists() and len(list(work.glob('logs/tokenize/completions/*'))) < 3
  done = _cli(*common, f'--out={out}')
  assert done.wait(300) == 0, done.stdout.read().decode()
  assert npy_hashes(out) == npy_hashes(ref) and len(npy_hashes(ref)) > 10
  assert not work.exists()


FAKE_SBATCH = '''#!/bin/bash
# Stand-in for Slurm's sbatch: runs every array task of the script at once, in submission order
# (so afterok dependencies hold), and answers as sbatch does.
script="${@: -1}"; n=$(cat "$COUNTER" 2>/dev/null || echo 0); echo $((n+1)) > "$COUNTER"
cp "$script" "$JOBS/job$n.slurm"; echo "$@" > "$JOBS/job$n.args"
range=$(grep -oP '(?<=#SBATCH --array=)[0-9]+-[0-9]+' "$script" || echo 0-0)
export SLURM_NODELIST=localhost SLURM_JOB_ID=$((n+100))
for i in $(seq ${range%-*} ${range#*-}); do SLURM_ARRAY_TASK_ID=$i RUN_OFFSET=0 bash "$script" >> "$JOBS/job$n.log" 2>&1 || exit 1; done
echo "Submitted batch job $((n+100))"
'''


@pytest.mark.slow   # a fake Slurm's array jobs (~8 s)
def test_slurm_executor_submits_dependent_array_jobs_that_prepare_the_same_data(corpus, tmp_path):
  bin_dir, jobs = tmp_path / 'bin', tmp_path / 'jobs'
  bin_dir.mkdir()
  jobs.mkdir()
  (bin_dir / 'sbatch').write_text(FAKE_SBATCH)
  (bin_dir / 'scontrol').write_text('#!/bin/bash\necho localhost\n')
  (bin_dir / 'srun').write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; [[ "$1" =~ ^[0-9]+$ ]] && shift; done\nexec "$@"\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = {'PATH': f'{bin_dir}:{Path(sys.executable).parent}:{os.environ["PATH"]}',
         'JOBS': str(jobs), 'COUNTER': str(tmp_path / 'n')}
  common = (f"--raw={corpus['raw']}", f"--tokenizer={corpus['tok']}", '--shard_tokens=20000')
  out = tmp_path / 'slurm_out'
  p = _cli(*common, f'--out={out}', '--executor=slurm', '--slurm_partition=cpu', env=env)
  log = p.stdout.read().decode()
  assert p.wait(300) == 0 and 'submitted the prepare stages' in log, log
  scripts = sorted(jobs.glob('job*.slurm'), key=lambda p: int(p.stem[3:]))
  names = [next(l.split('=')[1] for l in s.read_text().splitlines() if 'job-name' in l) for s in scripts]
  stages = [n for n in names if n.startswith('moejax-prepare-')]
  assert stages[::2] == [f'moejax-prepare-{s}' for s in ('tokenize', 'dedup_buckets', 'dedup_clusters',
                                                          'write_shards', 'manifest')], names
  for s, name in zip(scripts[2::2], names[2::2]):   # each stage waits for the one before
    assert '--dependency=afterok:' in (jobs / f'{s.stem}.args').read_text(), name
  assert all('#SBATCH --partition=cpu' in s.read_text() for s in scripts)
  ref = tmp_path / 'local_out'
  assert run(*common, f'--out={ref}') == 0
  assert npy_hashes(out) == npy_hashes(ref)
  done = _cli(*common, f'--out={out}', '--executor=slurm', '--slurm_partition=cpu', env=env)
  assert done.wait(60) == 0 and 'up to date' in done.stdout.read().decode()


@pytest.mark.slow   # a local Ray cluster takes about a minute to start and run the stages on 2 cores
def test_ray_executor_on_a_local_cluster_prepares_the_same_data(corpus, tmp_path):
  common = (f"--raw={corpus['raw']}", f"--tokenizer={corpus['tok']}", '--shard_tokens=20000')
  out = tmp_path / 'ray_out'
  p = _cli(*common, f'--out={out}', '--executor=ray', '--workers=2')
  log = p.stdout.read().decode()
  assert p.wait(900) == 0, log
  ref = tmp_path / 'local_out'
  assert run(*common, f'--out={ref}') == 0
  assert npy_hashes(out) == npy_hashes(ref)


def test_variants_join_across_files_and_a_repeated_variant_is_one_line_naming_it(corpus, tmp_path, capsys):
  a, b = tmp_path / 'a.jsonl', tmp_path / 'b.jsonl'
  texts = [json.loads(l)['text'] for l in Path(sorted(Path(corpus['raw']).parent.glob('*.jsonl'))[0]).read_text().splitlines()]
  a.write_text(''.join(json.dumps({'id': f'd{i}', 'text': texts[i]}) + '\n' for i in range(6)))
  b.write_text(''.join(json.dumps({'id': f'd{i}', 'variant': 'wiki', 'text': texts[10 + i][:300]}) + '\n'
                       for i in (4, 1)))
  out = tmp_path / 'v'
  assert run(f'--raw={a}', f'--raw={b}', f'--out={out}', f"--tokenizer={corpus['tok']}") == 0
  m = shards.load_manifest(str(out))
  assert m['variants'] == {'names': {'original': 6, 'wiki': 2}, 'docs_with_n_variants': {'1': 4, '2': 2}}
  tok = shards.load_tokenizer(str(out))
  entries = [tok.decode(e[:-1].tolist()) for s in ('train', 'val') for e in shards.split_entries(str(out), s)]
  for i in (1, 4):   # the rephrasing right after its original, in one shard
    assert entries[entries.index(texts[i]) + 1] == texts[10 + i][:300]
  b.write_text(json.dumps({'id': 'd2', 'variant': 'original', 'text': 'another text for d2'}) + '\n')
  err = _err(capsys, f'--raw={a}', f'--raw={b}', f"--out={tmp_path / 'w'}", f"--tokenizer={corpus['tok']}")
  assert "document 'd2' already has variant 'original'" in err and str(b) in err
