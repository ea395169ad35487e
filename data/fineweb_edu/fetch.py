"""Fetch FineWeb-Edu's 10B-token sample and the GPT-2 tokenizer ranks for data/fineweb_edu/.

- data/fineweb_edu/raw/sample/10BT/*.parquet: the `sample/10BT` subset of the Hugging Face dataset
  HuggingFaceFW/fineweb-edu (about 27 GB of Parquet, text in the `text` column, ids in `id`), with
  huggingface_hub.snapshot_download (resumes a partial download; set HF_TOKEN for higher limits).
- data/fineweb_edu/r50k_base.tiktoken: OpenAI's GPT-2 BPE ranks (r50k_base, 50256 ranks), checked
  against its published sha256. Prepare uses it with --tiktoken_pattern=gpt2 (EOD = 50256, vocab
  50257).

Usage: python data/fineweb_edu/fetch.py [--dir=data/fineweb_edu] [--only=data|tokenizer]
                                        [--allow_patterns='sample/10BT/*.parquet']
Both parts are skipped when already there (the Parquet download checks each file).
"""
import argparse
import hashlib
import sys
import urllib.request
from pathlib import Path

REPO_ID = 'HuggingFaceFW/fineweb-edu'
PATTERN = 'sample/10BT/*.parquet'
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


def fetch_data(raw: Path, allow_patterns: str) -> Path:
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    sys.exit('fetch.py needs huggingface_hub: pip install huggingface_hub')
  try:
    snapshot_download(repo_id=REPO_ID, repo_type='dataset', allow_patterns=allow_patterns,
                      local_dir=str(raw))
  except Exception as e:   # huggingface_hub's HTTP/offline errors and OSError
    sys.exit(f'{REPO_ID} ({allow_patterns}): cannot fetch ({type(e).__name__}: '
             f'{str(e).splitlines()[0] if str(e) else ""}); rerun to resume')
  files = sorted(raw.glob(allow_patterns))
  print(f'{raw}: {len(files)} files, {sum(f.stat().st_size for f in files) / 1e9:.1f} GB matching {allow_patterns}')
  return raw


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--dir', default=str(Path(__file__).resolve().parent))
  p.add_argument('--only', choices=('data', 'tokenizer'), default=None)
  p.add_argument('--allow_patterns', default=PATTERN, help='files of the dataset repo to fetch')
  ns = p.parse_args(argv)
  d = Path(ns.dir)
  if ns.only != 'data':
    fetch_ranks(d / 'r50k_base.tiktoken')
  if ns.only != 'tokenizer':
    fetch_data(d / 'raw', ns.allow_patterns)


if __name__ == '__main__':
  main()
