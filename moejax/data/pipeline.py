"""Training/eval input pipeline over prepared token arrays (see moejax.data.prepare).

Training stream: for epoch e the train documents are permuted with a seed derived from
(seed, e) and concatenated (each already ends with EOD); epochs follow each other in one
infinite stream, cut into windows of seq_len+1 tokens with stride seq_len, so every token is
a target exactly once per epoch and nothing is dropped at epoch ends.
Batches: dict(inputs=int32[B, L], targets=int32[B, L], loss_mask=float32[B, L]).
"""

import json
from pathlib import Path

import grain
import numpy as np
from tokenizers import Tokenizer

NUM_EPOCHS = 10_000  # length of the "infinite" training stream, in epochs


class DataError(ValueError):
    """Missing or inconsistent prepared data, or invalid pipeline arguments."""


def load_manifest(data_dir: str) -> dict:
    """Reads `data_dir/manifest.json` written by `python -m moejax.data.prepare`."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"data_dir: {data_dir} has no manifest.json; run `make data`")
    return json.loads(path.read_text())


def load_tokenizer(data_dir: str) -> Tokenizer:
    """Loads the tokenizer the data in `data_dir` was tokenized with."""
    load_manifest(data_dir)
    return Tokenizer.from_file(str(Path(data_dir) / "tokenizer.json"))


def _load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (tokens memmap [T], doc offsets int64 [num_docs+1]) of a split."""
    manifest = load_manifest(data_dir)
    if split not in manifest["splits"]:
        raise DataError(f"data_dir: {data_dir} has no '{split}' split")
    tokens = np.load(Path(data_dir) / f"{split}.tokens.npy", mmap_mode="r")
    offsets_i64 = np.load(Path(data_dir) / f"{split}.docs.npy")
    if offsets_i64[-1] != len(tokens) or len(offsets_i64) < 2:
        raise DataError(f"data_dir: {data_dir} has inconsistent {split} token/doc files")
    return tokens, offsets_i64


class PackedWindows:
    """Random-access windows int32[seq_len+1] over the infinite stream of epoch permutations.

    Window i covers stream positions [i*seq_len, i*seq_len + seq_len + 1). Epoch e is the
    concatenation of all documents in order `permutation(seed, e)` (identity if not shuffle).
    """

    def __init__(self, tokens, offsets_i64, *, seq_len: int, seed: int, shuffle: bool,
                 num_epochs: int):
        self._tokens = tokens
        self._offsets = offsets_i64
        self._doc_lens = np.diff(offsets_i64)
        self._seq_len = seq_len
        self._seed = seed
        self._shuffle = shuffle
        self.epoch_tokens = int(offsets_i64[-1] - offsets_i64[0])
        self._len = (num_epochs * self.epoch_tokens - 1) // seq_len
        self._last_epoch = (-1, None)

    def __len__(self) -> int:
        return self._len

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (doc order [num_docs], cumulative lengths int64 [num_docs+1]) of an epoch."""
        cached = self._last_epoch  # one atomic read; safe under grain's reader threads
        if cached[0] == epoch:
            return cached[1]
        num_docs = len(self._doc_lens)
        if self._shuffle:
            order = np.random.default_rng([self._seed, epoch]).permutation(num_docs)
        else:
            order = np.arange(num_docs)
        cum_i64 = np.concatenate([[0], np.cumsum(self._doc_lens[order])])
        self._last_epoch = (epoch, (order, cum_i64))
        return order, cum_i64

    def _read_epoch(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Tokens at positions [start, stop) of one epoch's stream."""
        order, cum_i64 = self._epoch_order(epoch)
        parts = []
        k = int(np.searchsorted(cum_i64, start, side="right")) - 1
        while start < stop:
            shift = self._offsets[order[k]] - cum_i64[k]  # stream position -> token index
            end = min(stop, int(cum_i64[k + 1]))
            parts.append(self._tokens[shift + start:shift + end])
            start, k = end, k + 1
        return np.concatenate(parts)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self._len:
            raise IndexError(index)
        start = index * self._seq_len
        stop = start + self._seq_len + 1
        parts = []
        while start < stop:
            epoch, pos = divmod(start, self.epoch_tokens)
            end = min(pos + stop - start, self.epoch_tokens)
            parts.append(self._read_epoch(epoch, pos, end))
            start += end - pos
        return np.concatenate(parts).astype(np.int32)


def _to_batch(windows_i32: np.ndarray) -> dict:
    """int32[B, L+1] windows -> dict(inputs, targets, loss_mask) of shape [B, L]."""
    return {"inputs": windows_i32[:, :-1], "targets": windows_i32[:, 1:],
            "loss_mask": np.ones(windows_i32[:, 1:].shape, np.float32)}


def train_dataset(data_dir: str, *, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Per-process training batches; process p gets rows [p*B:(p+1)*B] of each global batch.

    `batch_size` is the global batch size; B = batch_size // process_count.
    """
    if seq_len < 1 or batch_size < 1:
        raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if batch_size % process_count or not 0 <= process_index < process_count:
        raise DataError(f"batch_size {batch_size} / process {process_index} of {process_count}"
                        " is not a valid sharding")
    tokens, offsets_i64 = _load_split(data_dir, "train")
    windows = PackedWindows(tokens, offsets_i64, seq_len=seq_len, seed=seed, shuffle=True,
                            num_epochs=NUM_EPOCHS)
    local_batch = batch_size // process_count
    num_global_batches = len(windows) // batch_size
    ds = grain.MapDataset.source(windows)[:num_global_batches * batch_size]
    # Consecutive chunks of local_batch rows; process p owns chunks p, p+P, p+2P, ...
    ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
    return ds.map(_to_batch)


def train_iterator(ds: grain.MapDataset) -> grain.DatasetIterator:
    """Iterator over `ds` with small prefetch; get_state()/set_state() are JSON-serialisable."""
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
    return iter(ds.to_iter_dataset(read_options))


def eval_batches(data_dir: str, *, seq_len: int, batch_size: int, max_batches: int) -> list[dict]:
    """Deterministic 'val' batches in stored document order, no shuffling.

    Returns min(max_batches, batches in one pass over val) batches, at least one; a val split
    shorter than one batch wraps around.
    """
    if seq_len < 1 or batch_size < 1 or max_batches < 1:
        raise DataError("seq_len, batch_size and max_batches must be >= 1")
    tokens, offsets_i64 = _load_split(data_dir, "val")
    # Enough passes for one full batch even if val is a single token.
    windows = PackedWindows(tokens, offsets_i64, seq_len=seq_len, seed=0, shuffle=False,
                            num_epochs=batch_size * (seq_len + 1) + 1)
    num_batches = max(1, min(max_batches, (windows.epoch_tokens - 1) // seq_len // batch_size))
    ds = grain.MapDataset.source(windows).batch(batch_size, drop_remainder=True).map(_to_batch)
    return [ds[i] for i in range(num_batches)]
