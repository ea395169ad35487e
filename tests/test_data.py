"""Tests for moejax.data: the prepare recipe and the grain input pipeline."""

import collections
import json
import random

import numpy as np
import pytest

from moejax.data import pipeline, prepare, shards

WORDS = ('thou art the king of all my love and night doth fall upon the sea where '
         'gentle lords speak false words to fair ladies in a garden by the tower').split()
SEQ_LEN, BATCH = 32, 4


def _scene(rng: random.Random, title: str) -> str:
  lines = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))) for _ in range(12)]
  return f'{title}\n\nLORD.\n' + '\n'.join(lines) + '\n\n'


def write_corpus(raw_dir) -> str:
  """Writes 3 plays (2 acts x 5 scenes) and an exact duplicate of one scene; returns it."""
  rng = random.Random(0)
  raw_dir.mkdir()
  for play in range(3):
    text = f'PLAY {play}\n\nPERSONS REPRESENTED.\n\n'
    for act in ('I', 'II'):
      text += f'ACT {act}.\n\n'
      text += ''.join(_scene(rng, f'SCENE {s}. Room {play}.') for s in range(1, 6))
    (raw_dir / f'play{play}.txt').write_text(text)
  duplicate = _scene(random.Random(1), 'SCENE 9. The same.')
  (raw_dir / 'play0.txt').write_text((raw_dir / 'play0.txt').read_text() + duplicate)
  (raw_dir / 'copy.txt').write_text(duplicate)
  return duplicate


def run_prepare(raw, out, capsys, *extra) -> tuple[int, str, str]:
  code = prepare.main(['--workers=1', f'--raw={raw}', f'--out={out}', '--vocab_size=300',
                       '--val_fraction=0.2', *extra])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  write_corpus(root / 'raw')
  assert prepare.main(['--workers=1', f"--raw={root / 'raw'}", f"--out={root / 'prepared'}",
                       '--vocab_size=300', '--val_fraction=0.2']) == 0
  return str(root / 'prepared')


def split_docs(data_dir, split) -> list[np.ndarray]:
  return shards.split_entries(data_dir, split)


def take(iterator, n) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in ('inputs', 'targets', 'loss_mask'):
      np.testing.assert_array_equal(x[k], y[k])


def test_prepare_second_run_is_up_to_date_and_rerun_on_arg_change(tmp_path, capsys):
  write_corpus(tmp_path / 'raw')
  out = tmp_path / 'prepared'
  assert run_prepare(tmp_path / 'raw', out, capsys)[0] == 0
  mtime = (out / 'manifest.json').stat().st_mtime_ns
  code, stdout, _ = run_prepare(tmp_path / 'raw', out, capsys)
  assert (code, stdout) == (0, f'prepared data up to date: {out}\n')
  assert (out / 'manifest.json').stat().st_mtime_ns == mtime
  code, stdout, _ = run_prepare(tmp_path / 'raw', out, capsys, '--seed=1')
  assert code == 0 and 'up to date' not in stdout
  assert json.loads((out / 'manifest.json').read_text())['args']['seed'] == 1
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temp dirs left


def test_prepare_manifest_describes_outputs(data_dir):
  manifest = shards.load_manifest(data_dir)
  assert manifest['eod_id'] == 0 and manifest['vocab_size'] == 300
  assert manifest['duplicate_docs_removed'] == 1
  for split in ('train', 'val'):
    stats = manifest['splits'][split]
    [shard] = stats['shards']   # a small corpus: one shard per split
    tokens = np.load(f"{data_dir}/{shard['name']}.tokens.npy", mmap_mode='r')
    offsets = np.load(f"{data_dir}/{shard['name']}.docs.npy")
    assert tokens.dtype == np.uint16 and offsets.dtype == np.int64
    assert (stats['num_entries'], stats['num_tokens']) == (len(offsets) - 1, len(tokens))
    assert stats['num_docs'] == stats['num_entries']  # plain .txt: one variant per document


def test_train_and_val_hold_disjoint_whole_documents(data_dir):
  tok = shards.load_tokenizer(data_dir)
  train = {tok.decode(d[:-1].tolist()) for d in split_docs(data_dir, 'train')}
  val = {tok.decode(d[:-1].tolist()) for d in split_docs(data_dir, 'val')}
  assert train and val and not train & val
  assert all(d.startswith(('PLAY', 'ACT', 'SCENE')) for d in train | val)


def test_every_document_ends_with_eod_and_eod_occurs_nowhere_else(data_dir):
  for split in ('train', 'val'):
    for doc in split_docs(data_dir, split):
      assert doc[-1] == 0 and not (doc[:-1] == 0).any()


def test_tokenizer_round_trips_text(data_dir):
  tok = shards.load_tokenizer(data_dir)
  for text in ("  Thou art, my lord!\n\n\tNay —  'tis ünïcode ✓", 'x', '\n'):
    assert tok.decode(tok.encode(text)) == text


def test_prepare_reports_missing_raw_dir_and_empty_corpus_as_one_line_exit_2(tmp_path, capsys):
  code, _, err = run_prepare(tmp_path / 'nope', tmp_path / 'out', capsys)
  assert code == 2 and str(tmp_path / 'nope') in err and err.count('\n') == 1
  (tmp_path / 'empty').mkdir()
  code, _, err = run_prepare(tmp_path / 'empty', tmp_path / 'out', capsys)
  assert code == 2 and 'empty' in err and err.count('\n') == 1, err
  assert not (tmp_path / 'out').exists()


def test_prepare_with_given_tokenizer_reuses_it(data_dir, tmp_path, capsys):
  raw = tmp_path / 'raw'
  write_corpus(raw)
  code, _, _ = run_prepare(raw, tmp_path / 'out', capsys,
                           f'--tokenizer={data_dir}/tokenizer.json', '--seed=3')
  assert code == 0
  manifest = shards.load_manifest(str(tmp_path / 'out'))
  assert manifest['tokenizer_sha256'] == shards.load_manifest(data_dir)['tokenizer_sha256']


def test_train_batches_have_expected_shapes_and_targets_are_inputs_shifted_by_one(data_dir):
  ds = pipeline.train_dataset(data_dir, seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
  batches = take(pipeline.train_iterator(ds), 3)
  for b in batches:
    assert b['inputs'].shape == b['targets'].shape == b['loss_mask'].shape == (BATCH, SEQ_LEN)
    assert b['inputs'].dtype == b['targets'].dtype == np.int32
    assert b['loss_mask'].dtype == np.float32
    np.testing.assert_array_equal(b['targets'][:, :-1], b['inputs'][:, 1:])
  rows = [(b['inputs'][r], b['targets'][r]) for b in batches for r in range(BATCH)]
  for (_, prev_targets), (inputs, _) in zip(rows[:-1], rows[1:]):
    assert inputs[0] == prev_targets[-1]  # windows tile the packed stream


def test_train_batches_are_deterministic_for_a_fixed_seed(data_dir):
  def first(seed):
    ds = pipeline.train_dataset(data_dir, seq_len=SEQ_LEN, batch_size=BATCH, seed=seed)
    return take(pipeline.train_iterator(ds), 5)
  assert_batches_equal(first(0), first(0))
  assert not np.array_equal(first(0)[0]['inputs'], first(1)[0]['inputs'])


def test_each_epoch_is_a_new_order_of_the_same_token_multiset(data_dir):
  num_tokens = shards.load_manifest(data_dir)['splits']['train']['num_tokens']
  ds = pipeline.train_dataset(data_dir, seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
  num_batches = 2 * num_tokens // (SEQ_LEN * BATCH) + 1
  stream = np.concatenate([ds[i]['inputs'].reshape(-1) for i in range(num_batches)])
  epoch0, epoch1 = stream[:num_tokens], stream[num_tokens:2 * num_tokens]
  all_train = np.concatenate(split_docs(data_dir, 'train'))
  assert collections.Counter(epoch0.tolist()) == collections.Counter(all_train.tolist())
  assert collections.Counter(epoch1.tolist()) == collections.Counter(all_train.tolist())
  assert not np.array_equal(epoch0, epoch1)


def test_process_shards_concatenate_to_the_single_process_batch(data_dir):
  kwargs = dict(seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
  single = pipeline.train_dataset(data_dir, **kwargs)
  shards = [pipeline.train_dataset(data_dir, process_index=p, process_count=2, **kwargs)
            for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(single)
  for i in (0, 1, 7):
    for k in ('inputs', 'targets', 'loss_mask'):
      assert shards[0][i][k].shape[0] == BATCH // 2
      np.testing.assert_array_equal(
          np.concatenate([shards[0][i][k], shards[1][i][k]]), single[i][k])


def test_iterator_state_round_trip_resumes_identically(data_dir):
  ds = pipeline.train_dataset(data_dir, seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
  uninterrupted = pipeline.train_iterator(ds)
  take(uninterrupted, 4)
  state = json.loads(json.dumps(uninterrupted.get_state()))
  expected = take(uninterrupted, 3)
  resumed = pipeline.train_iterator(
      pipeline.train_dataset(data_dir, seq_len=SEQ_LEN, batch_size=BATCH, seed=0))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)


def test_eval_batches_are_deterministic_and_wrap_when_val_is_short(data_dir):
  val_tokens = shards.load_manifest(data_dir)['splits']['val']['num_tokens']
  a = pipeline.eval_batches(data_dir, seq_len=SEQ_LEN, batch_size=BATCH, max_batches=2)
  assert_batches_equal(a, pipeline.eval_batches(data_dir, seq_len=SEQ_LEN, batch_size=BATCH,
                                                max_batches=2))
  assert len(a) == 2
  stream = np.concatenate(split_docs(data_dir, 'val'))
  np.testing.assert_array_equal(a[0]['inputs'][0], stream[:SEQ_LEN])
  big = pipeline.eval_batches(data_dir, seq_len=val_tokens, batch_size=2, max_batches=5)
  assert len(big) == 1
  np.testing.assert_array_equal(big[0]['inputs'][1][:SEQ_LEN], stream[:SEQ_LEN])  # wrapped


def test_missing_data_dir_raises_data_error_naming_it(tmp_path):
  missing = str(tmp_path / 'no_such_dir')
  for call in (lambda: shards.load_manifest(missing),
               lambda: pipeline.train_dataset(missing, seq_len=8, batch_size=2, seed=0),
               lambda: pipeline.eval_batches(missing, seq_len=8, batch_size=2, max_batches=1)):
    with pytest.raises(pipeline.DataError, match='no_such_dir') as err:
      call()
    assert '\n' not in str(err.value)
