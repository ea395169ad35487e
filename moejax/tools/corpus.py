"""A seeded synthetic web-like corpus for data-pipeline benchmarks: JSONL files of {"id", "text"}
with Zipf-distributed words, plus planted exact duplicates (3% of documents) and near duplicates
(3%: a copy of an earlier document with 1 word in 100 replaced), of the 200 latest distinct ones.

python -m moejax.tools.corpus OUT_DIR MEGABYTES [FILES]   -> prints the counts as JSON

Document n goes to file n % FILES (part-000.jsonl, ...). `make` also writes OUT_DIR.groups.npy (next
to the directory, so a prepare of OUT_DIR does not read it): for each document, in file order
(file 0's lines, then file 1's, ...), the index of the distinct document it is a copy of (itself
for a distinct one) -- what a perfect deduplication keeps one of.
"""
import json
import os
import sys

import numpy as np

SYLLABLES = ['ka', 'lo', 'mi', 'ne', 'ru', 'ta', 'vo', 'shi', 'en', 'de', 'ar', 'po', 'li', 'um', 'zo']
EXACT, NEAR = 0.03, 0.03
RECENT = 200


def make(out: str, mb: float, files: int = 4, seed: int = 1234) -> dict:
  """Writes about `mb` MiB of JSONL into `files` files under `out`; returns the counts
  (documents, distinct, exact, near, bytes, text_bytes: UTF-8 bytes of the texts) and the groups file's path."""
  rng = np.random.default_rng(seed)
  words = sorted({''.join(rng.choice(SYLLABLES, rng.integers(1, 4))) for _ in range(40000)})
  p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
  cdf = np.cumsum(p / p.sum())
  cdf[-1] = 1.0

  def doc(n: int) -> str:
    w = [words[i] for i in np.searchsorted(cdf, rng.random(n)).tolist()]
    sentences, i = [], 0
    for k in rng.integers(8, 20, size=n // 8 + 1).tolist():
      if i >= n:
        break
      s = w[i:i + k]
      sentences.append(' '.join([s[0].capitalize(), *s[1:]]) + '.')
      i += k
    return ' '.join(sentences)

  os.makedirs(out, exist_ok=True)
  fh = [open(f'{out}/part-{i:03d}.jsonl', 'w') for i in range(files)]
  target, size, n, text_bytes = mb * 2 ** 20, 0, 0, 0
  counts = {'distinct': 0, 'exact': 0, 'near': 0}
  recent: list[tuple[int, str]] = []   # (document index, text) of the latest distinct ones
  group = []
  while size < target:
    r = rng.random()
    if recent and r < EXACT:
      src, text = recent[int(rng.integers(len(recent)))]
      counts['exact'] += 1
    elif recent and r < EXACT + NEAR:
      src, text = recent[int(rng.integers(len(recent)))]
      w = text.split(' ')
      for j in rng.choice(len(w), max(1, len(w) // 100), replace=False).tolist():
        w[j] = words[int(rng.integers(len(words)))]
      text = ' '.join(w)
      counts['near'] += 1
    else:
      src, text = n, doc(int(rng.integers(200, 1500)))
      counts['distinct'] += 1
      recent.append((n, text))
      recent = recent[-RECENT:]
    line = json.dumps({'id': f'doc{n}', 'text': text}) + '\n'
    fh[n % files].write(line)
    group.append(src)
    size += len(line)
    text_bytes += len(text.encode())
    n += 1
  for f in fh:
    f.close()
  group = np.asarray(group, np.int64)
  order = np.concatenate([np.arange(i, n, files) for i in range(files)])   # file order
  groups_path = f'{out.rstrip("/")}.groups.npy'
  np.save(groups_path, group[order])
  return {'documents': n, **counts, 'bytes': size, 'text_bytes': text_bytes, 'files': files, 'groups': groups_path}


if __name__ == '__main__':
  if len(sys.argv) not in (3, 4):
    sys.exit(__doc__)
  print(json.dumps(make(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 4)))
