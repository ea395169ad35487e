"""Fetch FineWeb-Edu (the 10B-token sample, or the 100B shuffle of the accelerator speedrun) and
the GPT-2 tokenizer ranks for data/fineweb_edu/.

- data/fineweb_edu/raw/sample/10BT/*.parquet (default, --sample=10BT): the `sample/10BT` subset of
  the Hugging Face dataset HuggingFaceFW/fineweb-edu (about 27 GB of Parquet, text in the `text`
  column, ids in `id`), with huggingface_hub.snapshot_download (resumes a partial download; set
  HF_TOKEN for higher limits).
- --sample=100BT-shuffle: karpathy/fineweb-edu-100b-shuffle, FineWeb-Edu's `sample-100BT` shuffled
  and cut into 1,823 Parquet shards shard_00000 .. shard_01822 (~94 MB, ~54M GPT-2 tokens each;
  `text` only), the data of nmoe's and nanochat's speedruns. The last shard, shard_01822.parquet, is
  their validation shard: it goes to raw/100BT-shuffle/val/, and the first --train_shards shards
  (default 200, ~10.8B tokens; nmoe prepares 10B) to raw/100BT-shuffle/train/ (never the val shard).
- data/fineweb_edu/r50k_base.tiktoken: OpenAI's GPT-2 BPE ranks (r50k_base, 50256 ranks), checked
  against its published sha256. Prepare uses it with --tiktoken_pattern=gpt2 (EOD = 50256, vocab
  50257).

Usage: python data/fineweb_edu/fetch.py [--dir=data/fineweb_edu] [--only=data|tokenizer]
                                        [--allow_patterns='sample/10BT/*.parquet']
       python data/fineweb_edu/fetch.py --sample=100BT-shuffle [--train_shards=200] [--only=...]
Both parts are skipped when already there (the Parquet download checks each file).
"""
import argparse
import hashlib
import sys
import urllib.request
from pathlib import Path

REPO_ID = 'HuggingFaceFW/fineweb-edu'
PATTERN = 'sample/10BT/*.parquet'
SHUFFLE_REPO_ID = 'karpathy/fineweb-edu-100b-shuffle'
SHUFFLE_DIR = '100BT-shuffle'            # under raw/: train/ and val/
SHUFFLE_NUM_SHARDS = 1823                # shard_00000 .. shard_01822
SHUFFLE_VAL_SHARD = 'shard_01822.parquet'   # nmoe's (NMOE_SPEEDRUN_VAL_DATA_FILE) and nanochat's val shard
SHUFFLE_TRAIN_SHARDS = 200               # ~10.8B tokens: nmoe's speedrun prepares 10B train tokens
RANKS_URL = 'https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken'
RANKS_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'


def fetch_ranks(path: Path) -> Path:
  if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == RANKS_SHA256:
    print(f'{path}: up to date')
    return path
  try:
    with urllib.request.urlopen(RANKS_URL, timeout=60) as r:
      data = r.read()
  except OSError as e:   # URLError, timeouts: no network here
    sys.exit(f'{RANKS_URL}: cannot fetch ({getattr(e, "reason", e)}); copy r50k_base.tiktoken to {path} '
             'from a machine with a network')
  digest = hashlib.sha256(data).hexdigest()
  if digest != RANKS_SHA256:
    sys.exit(f'{RANKS_URL}: sha256 {digest}, expected {RANKS_SHA256}; not written')
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  tmp.write_bytes(data)
  tmp.rename(path)
  print(f'{path}: {len(data)} bytes')
  return path


def fetch_data(raw: Path, allow_patterns: str | list[str], repo_id: str = REPO_ID) -> Path:
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    sys.exit('fetch.py needs huggingface_hub: pip install huggingface_hub')
  patterns = [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns)
  shown = allow_patterns if isinstance(allow_patterns, str) else (
      patterns[0] if len(patterns) == 1 else f'{patterns[0]} .. {patterns[-1]} ({len(patterns)} files)')
  try:
    snapshot_download(repo_id=repo_id, repo_type='dataset', allow_patterns=allow_patterns,
                      local_dir=str(raw))
  except Exception as e:   # huggingface_hub's HTTP/offline errors and OSError
    sys.exit(f'{repo_id} ({shown}): cannot fetch ({type(e).__name__}: '
             f'{str(e).splitlines()[0] if str(e) else ""}); rerun to resume')
  files = sorted({f for p in patterns for f in raw.glob(p)})
  print(f'{raw}: {len(files)} files, {sum(f.stat().st_size for f in files) / 1e9:.1f} GB matching {shown}')
  return raw


def shuffle_files(train_shards: int) -> tuple[list[str], list[str]]:
  """(train, val) file names of the 100B shuffle: the first `train_shards` shards but the val
  shard, and the val shard."""
  if not 1 <= train_shards < SHUFFLE_NUM_SHARDS:
    sys.exit(f'--train_shards: must be in [1, {SHUFFLE_NUM_SHARDS - 1}], got {train_shards}')
  train = [f'shard_{i:05d}.parquet' for i in range(train_shards)]
  return [f for f in train if f != SHUFFLE_VAL_SHARD], [SHUFFLE_VAL_SHARD]


def fetch_shuffle(raw: Path, train_shards: int) -> Path:
  """raw/100BT-shuffle/{train,val}/shard_*.parquet (see the module doc)."""
  train, val = shuffle_files(train_shards)
  root = raw / SHUFFLE_DIR
  fetch_data(root / 'val', val, SHUFFLE_REPO_ID)
  fetch_data(root / 'train', train, SHUFFLE_REPO_ID)
  return root


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--dir', default=str(Path(__file__).resolve().parent))
  p.add_argument('--only', choices=('data', 'tokenizer'), default=None)
  p.add_argument('--sample', choices=('10BT', '100BT-shuffle'), default='10BT',
                 help=f'10BT: {REPO_ID} sample/10BT; 100BT-shuffle: {SHUFFLE_REPO_ID} (the speedrun)')
  p.add_argument('--allow_patterns', default=PATTERN, help='files of the dataset repo to fetch (10BT)')
  p.add_argument('--train_shards', type=int, default=SHUFFLE_TRAIN_SHARDS,
                 help=f'100BT-shuffle: the first N shards for training (the val shard {SHUFFLE_VAL_SHARD} always)')
  ns = p.parse_args(argv)
  d = Path(ns.dir)
  if ns.only != 'data':
    fetch_ranks(d / 'r50k_base.tiktoken')
  if ns.only != 'tokenizer':
    if ns.sample == '100BT-shuffle':
      fetch_shuffle(d / 'raw', ns.train_shards)
    else:
      fetch_data(d / 'raw', ns.allow_patterns)


if __name__ == '__main__':
  main()
