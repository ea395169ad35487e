"""Append-only JSONL files that survive kill -9: each record is one os.write of one whole line on
an O_APPEND descriptor (a crash leaves whole lines plus at most one torn last line), and `repair`
cuts a torn last line off before appending again, so the file stays valid JSONL for any reader.
The judge's labels and the rephrase stage's outputs are written this way; re-running a command
reads what is there and skips it.
"""
import json
import os
import threading


def repair(path: str) -> int:
  """Truncates a torn (unterminated) last line; returns the bytes cut."""
  try:
    size = os.path.getsize(path)
  except FileNotFoundError:
    return 0
  if not size:
    return 0
  with open(path, 'rb+') as f:
    f.seek(max(0, size - 1))
    if f.read(1) == b'\n':
      return 0
    pos = size
    while pos > 0:   # back to the last newline, 64 KiB at a time
      step = min(pos, 1 << 16)
      f.seek(pos - step)
      chunk = f.read(step)
      k = chunk.rfind(b'\n')
      if k >= 0:
        pos = pos - step + k + 1
        break
      pos -= step
    f.truncate(pos)
  return size - pos


def read(path: str):
  """The records of a file (lines that do not parse are skipped: there are none after repair)."""
  if not os.path.isfile(path):
    return
  with open(path, 'rb') as f:
    for line in f:
      if line.strip():
        try:
          yield json.loads(line)
        except ValueError:
          continue


class Appender:
  """Appends records, one atomic write per line, flushed to the OS at once (thread-safe)."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    repair(path)
    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    self._lock = threading.Lock()

  def write(self, record: dict):
    data = (json.dumps(record, ensure_ascii=False) + '\n').encode()
    with self._lock:
      n = os.write(self._fd, data)
      if n != len(data):   # a short write (full disk): never leave half a line behind
        raise OSError(f'short write ({n} of {len(data)} bytes)')

  def close(self):
    os.close(self._fd)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
