"""What a report stamps itself with: the exact command and the git commit of the code that made it."""
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _git(*args: str) -> str:
  return subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def commit() -> str:
  """The short HEAD commit, '(with uncommitted changes)' when the checkout differs from it (untracked,
  not ignored files count: a new study or module is code too); 'unknown' outside a git checkout.
  Call it before the tool writes anything (its outputs may be tracked)."""
  try:
    head = _git('rev-parse', '--short', 'HEAD')
    dirty = _git('status', '--porcelain')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return head + (' (with uncommitted changes)' if dirty else '')


def command(module: str, argv: list[str] | None = None) -> str:
  """`python -m <module> <args>` as typed (shell-quoted), from sys.argv unless argv is given."""
  args = sys.argv[1:] if argv is None else argv
  return ' '.join(['python', '-m', module, *map(shlex.quote, args)])
