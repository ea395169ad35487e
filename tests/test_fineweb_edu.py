"""data/fineweb_edu: fetch.py without a network (which files of which Hub repo each --sample asks
huggingface_hub.snapshot_download for; the call is recorded, not made) and the 100B-shuffle recipe
of the speedrun on tiny stand-in shards (README.md's prepare commands, experiments/speedrun_fineweb_edu.py)."""
import importlib.util
import sys
import types

import pytest
from runs import REPO


@pytest.fixture
def fetch(monkeypatch):
  spec = importlib.util.spec_from_file_location('fineweb_fetch', REPO / 'data/fineweb_edu/fetch.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  calls = []

  def snapshot_download(repo_id, repo_type, allow_patterns, local_dir):
    calls.append((repo_id, allow_patterns, local_dir))

  monkeypatch.setitem(sys.modules, 'huggingface_hub', types.SimpleNamespace(snapshot_download=snapshot_download))
  module.calls = calls
  return module


def test_default_still_fetches_sample_10bt(fetch, tmp_path):
  fetch.main([f'--dir={tmp_path}', '--only=data'])
  assert fetch.calls == [('HuggingFaceFW/fineweb-edu', 'sample/10BT/*.parquet', str(tmp_path / 'raw'))]


def test_100bt_shuffle_fetches_train_shards_and_the_val_shard_apart(fetch, tmp_path):
  fetch.main([f'--dir={tmp_path}', '--only=data', '--sample=100BT-shuffle', '--train_shards=3'])
  root = tmp_path / 'raw' / '100BT-shuffle'
  assert fetch.calls == [
      ('karpathy/fineweb-edu-100b-shuffle', ['shard_01822.parquet'], str(root / 'val')),
      ('karpathy/fineweb-edu-100b-shuffle', [f'shard_0000{i}.parquet' for i in range(3)], str(root / 'train'))]
  train, val = fetch.shuffle_files(1822)   # all the others: the val shard is never trained on
  assert len(train) == 1822 and val == ['shard_01822.parquet'] and 'shard_01822.parquet' not in train
  with pytest.raises(SystemExit, match='--train_shards'):
    fetch.shuffle_files(1823)


def test_the_speedrun_recipe_trains_on_the_train_shards_and_evaluates_the_val_shard(tmp_path, monkeypatch):
  """README's "100B shuffle" prepare commands on tiny stand-in shards (text only, as the Hub's),
  then the speedrun config pointed at them: data checks pass, training reads the train shards,
  eval/loss the val shard."""
  import random

  import pyarrow as pa
  import pyarrow.parquet as pq
  from test_data_tokenizer import write_ranks

  from moejax import cli
  from moejax.data import pipeline, prepare, shards
  from moejax.validate import validate

  monkeypatch.setenv('TIKTOKEN_CACHE_DIR', '')
  raw = tmp_path / 'raw/100BT-shuffle'
  rng = random.Random(0)
  words = {'train': 'the king thou art in a thing of kings'.split(), 'val': 'queens night ou th'.split()}
  for split, names, docs in (('train', ['shard_00000', 'shard_00001'], 200), ('val', ['shard_01822'], 100)):
    (raw / split).mkdir(parents=True)
    for name in names:
      texts = [' '.join(rng.choice(words[split]) for _ in range(60)) for _ in range(docs)]
      pq.write_table(pa.table({'text': texts}), raw / split / f'{name}.parquet')
  write_ranks(tmp_path / 'r50k_base.tiktoken')
  common = [f'--tokenizer={tmp_path}/r50k_base.tiktoken', '--tiktoken_pattern=gpt2', '--dedup=none', '--workers=1']
  assert prepare.main([f'--raw={raw}/train/*.parquet', f'--out={tmp_path}/prepared_100bt', *common,
                       '--val_fraction=0.00001']) == 0
  assert prepare.main([f'--raw={raw}/val/shard_01822.parquet', f'--out={tmp_path}/prepared_100bt_val', *common,
                       '--val_fraction=0.9999']) == 0
  assert shards.load_manifest(f'{tmp_path}/prepared_100bt_val')['splits']['val']['num_docs'] == 99

  c = cli.load_config(str(REPO / 'experiments/speedrun_fineweb_edu.py'))
  c.data.dir = f'{tmp_path}/prepared_100bt_val'
  c.data.sources.fineweb_edu.dir = f'{tmp_path}/prepared_100bt'
  c.train.seq_len, c.train.batch_size = 64, 8
  validate(c, 8, check_data=True)
  ds, _ = pipeline.train_data(pipeline.sources_from_config(c.data), seq_len=64, batch_size=8, seed=0,
                              tokenizer_dir=c.data.dir)
  evals = pipeline.eval_batches(c.data.dir, seq_len=64, batch_size=8, max_batches=c.train.eval_batches)
  assert len(evals) == 20
  tok = shards.load_tokenizer(c.data.dir)
  assert 'queens' in tok.decode(evals[0]['inputs'][0].tolist()) and 'king' not in tok.decode(evals[0]['inputs'][0].tolist())
  assert 'king' in tok.decode(ds[0]['inputs'][0].tolist())
