"""The cheap classifier behind `judge train`: a linear regression on hashed word features that
predicts the judge's 0-5 grade, FineWeb-Edu style (a regression head whose rounded, clipped output
is the integer score).

Why this one: it needs nothing beyond scikit-learn (already pulled in by lm-eval; fastText wheels
do not build on Python 3.13 here), the featurizer is stateless (a hash of each lower-cased word,
so scoring needs no vocabulary and any worker scores any shard), training on thousands of labels
takes well under a second and scoring is one sparse dot product per document, so a whole corpus
scores at tokenizer-decode speed on CPUs. Feature blocks (--features), per document:
  presence   1 for each distinct word present (default: grades that count kinds of content),
  frequency  the words' relative frequencies, x FREQ_SCALE (grades that weigh the share of the
             text that is of some kind);
ridge regression (L2) on the blocks side by side, its strength chosen by leave-one-out error on
the training part (RidgeCV). `train` holds out a seeded --held_out fraction of the labels and
reports accuracy (rounded prediction == the judge's grade), macro F1 over the grades and F1 of the
binary "score >= --threshold" decision, on those held-out documents only.

Saved model (DIR): classifier.json (features, hash size, intercept, metrics, provenance) and
weights.npz (the non-zero weights as indices int64 + values float32); no pickles.
"""
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

MAX_SCORE = 5
N_FEATURES = 1 << 20
FREQ_SCALE = 30.0
FEATURES = ('presence', 'frequency')
DEFAULT_FEATURES = ('presence',)
ALPHAS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


class ClassifierError(Exception):
  """Bad labels or a bad model directory; one line."""


class Model:
  """Scores texts: score(texts) -> float32 [n] in [0, MAX_SCORE]."""

  def __init__(self, features: tuple[str, ...], n_features: int, weights_F: np.ndarray,
               intercept: float, info: dict | None = None):
    self.features, self.n_features = tuple(features), n_features
    self.weights_F, self.intercept, self.info = weights_F.astype(np.float32), float(intercept), info or {}

  def score(self, texts: list[str]) -> np.ndarray:
    if not texts:
      return np.zeros(0, np.float32)
    X = featurize(texts, self.features, self.n_features)
    return np.clip(X @ self.weights_F + self.intercept, 0, MAX_SCORE).astype(np.float32)

  def save(self, out: str):
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    nz = np.flatnonzero(self.weights_F)
    with tempfile.NamedTemporaryFile(dir=d, suffix='.npz', delete=False) as f:
      np.savez(f, indices=nz.astype(np.int64), values=self.weights_F[nz])
    os.chmod(f.name, 0o644)
    os.replace(f.name, d / 'weights.npz')
    meta = dict(self.info, kind='ridge on hashed words', features=list(self.features),
                n_features=self.n_features, intercept=self.intercept, max_score=MAX_SCORE,
                weights_sha256=hashlib.sha256((d / 'weights.npz').read_bytes()).hexdigest())
    tmp = d / 'classifier.json.tmp'
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, d / 'classifier.json')


def load(model_dir: str) -> Model:
  d = Path(model_dir)
  try:
    meta = json.loads((d / 'classifier.json').read_text())
    w = np.load(d / 'weights.npz')
    weights = np.zeros(int(meta['n_features']) * len(meta['features']), np.float32)
    weights[w['indices']] = w['values']
    return Model(tuple(meta['features']), int(meta['n_features']), weights, meta['intercept'], meta)
  except (OSError, ValueError, KeyError, IndexError) as e:
    raise ClassifierError(f'--model_dir: {model_dir} holds no classifier from `judge train` '
                          f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None


def model_sha256(model_dir: str) -> str:
  """What a score file was made with: the classifier's json and weights."""
  d = Path(model_dir)
  return hashlib.sha256((d / 'classifier.json').read_bytes() + (d / 'weights.npz').read_bytes()).hexdigest()


def featurize(texts: list[str], features: tuple[str, ...], n_features: int):
  """CSR [n, len(features) * n_features]: the feature blocks side by side."""
  import scipy.sparse as sp
  from sklearn.feature_extraction.text import HashingVectorizer
  blocks = []
  for f in features:
    if f == 'presence':
      v = HashingVectorizer(n_features=n_features, binary=True, norm=None, alternate_sign=False)
      blocks.append(v.transform(texts))
    elif f == 'frequency':
      v = HashingVectorizer(n_features=n_features, norm='l1', alternate_sign=False)
      blocks.append(v.transform(texts) * FREQ_SCALE)
    else:
      raise ClassifierError(f'--features: unknown {f!r}; choose from {list(FEATURES)}')
  return sp.hstack(blocks).tocsr().astype(np.float32)


def fit(texts: list[str], scores: np.ndarray, features=DEFAULT_FEATURES, n_features=N_FEATURES) -> Model:
  from sklearn.linear_model import RidgeCV
  X = featurize(texts, tuple(features), n_features)
  reg = RidgeCV(alphas=ALPHAS).fit(X, np.asarray(scores, np.float64))
  return Model(tuple(features), n_features, np.asarray(reg.coef_, np.float32), float(reg.intercept_),
               {'alpha': float(reg.alpha_)})


def grades(scores) -> np.ndarray:
  """Integer grades: round(clip(score, 0, 5)), as FineWeb-Edu's int_score."""
  return np.clip(np.rint(np.asarray(scores, np.float64)), 0, MAX_SCORE).astype(np.int64)


def metrics(judge, predicted, threshold: float) -> dict:
  """Accuracy, macro F1 over grades, and F1 of grade >= threshold, of predictions against the judge."""
  from sklearn.metrics import f1_score
  y, p = grades(judge), grades(predicted)
  return {'accuracy': float((y == p).mean()),
          'macro_f1': float(f1_score(y, p, average='macro', labels=sorted(set(y)), zero_division=0)),
          'binary_f1': float(f1_score(y >= threshold, p >= threshold, zero_division=0)),
          'held_out': int(len(y))}


def read_labels(path: str) -> dict[str, float]:
  """{id: score} (a later label of an id replaces an earlier one)."""
  from moejax.data import jsonl_log
  if not os.path.isfile(path):
    raise ClassifierError(f'--labels: no file {path}')
  out = {}
  for n, r in enumerate(jsonl_log.read(path), 1):
    if not isinstance(r, dict) or 'id' not in r or not isinstance(r.get('score'), (int, float)):
      raise ClassifierError(f'--labels: {path}: record {n} has no "id" and numeric "score"')
    out[str(r['id'])] = float(r['score'])
  if not out:
    raise ClassifierError(f'--labels: {path} holds no labels')
  return out


def cmd_train(a) -> int:
  from moejax.data import sources
  if not 0 < a.held_out < 1:
    raise ClassifierError(f'--held_out must be in (0, 1), got {a.held_out}')
  try:
    labels = read_labels(a.labels)
    raw = [r for spec in a.raw for r in spec.split(',') if r]
    texts = {}
    for doc_id, text in sources.originals(raw, sources.read_options(a)):
      if doc_id in labels:
        texts[doc_id] = text
  except sources.SourceError as e:
    raise ClassifierError(str(e)) from None
  missing = [d for d in labels if d not in texts]
  if missing:
    raise ClassifierError(f'--labels: {len(missing)} of {len(labels)} labels are for documents '
                          f'not in --raw (e.g. {missing[0]!r}); label this corpus or pass the '
                          'corpus the labels came from')
  ids = sorted(labels)
  y = np.array([labels[d] for d in ids])
  perm = np.random.default_rng(a.seed).permutation(len(ids))
  n_test = max(1, round(a.held_out * len(ids)))
  if len(ids) - n_test < 2:
    raise ClassifierError(f'--labels: {len(ids)} labels are too few to train and hold some out')
  test, train = perm[:n_test], perm[n_test:]
  features = tuple(f for f in a.features.split(',') if f)
  m = fit([texts[ids[i]] for i in train], y[train], features, 1 << a.hash_bits)
  held = metrics(y[test], m.score([texts[ids[i]] for i in test]), a.threshold)
  m.info.update(held_out=held, labels=os.path.abspath(a.labels), num_labels=len(ids),
                num_train=len(train), seed=a.seed, threshold=a.threshold)
  m.save(a.out)
  print(f'trained {a.out} on {len(train)} labels (ridge alpha {m.info["alpha"]:g}, features '
        f'{",".join(features)}); on {held["held_out"]} held-out documents: macro-F1 '
        f'{held["macro_f1"]:.3f}, F1 (score >= {a.threshold:g}) {held["binary_f1"]:.3f}, '
        f'held-out accuracy {held["accuracy"]:.3f}')
  return 0


def add_parser(sub, add_read_flags):
  p = sub.add_parser('train', help='train the classifier on judge labels')
  p.add_argument('--labels', required=True, help='labels JSONL from `judge label`')
  add_read_flags(p)
  p.add_argument('--out', required=True, help='model directory to write')
  p.add_argument('--held_out', type=float, default=0.1, help='fraction of labels held out')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--threshold', type=float, default=3, help='for the binary F1 (FineWeb-Edu: 3)')
  p.add_argument('--features', default=','.join(DEFAULT_FEATURES), help=f'comma-separated: {",".join(FEATURES)}')
  p.add_argument('--hash_bits', type=int, default=20, help='2^bits hashed features per block')
  p.set_defaults(fn=cmd_train)


if __name__ == '__main__':
  sys.exit('use: python -m moejax.data.judge train ...')
