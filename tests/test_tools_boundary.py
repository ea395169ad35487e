"""The core never imports moejax.tools: the tools import the core, not the other way round."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported(path: Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
  return names


def test_core_never_imports_tools():
  core = [p for p in (ROOT / 'moejax').rglob('*.py') if 'tools' not in p.relative_to(ROOT / 'moejax').parts]
  assert len(core) > 20
  bad = {str(p.relative_to(ROOT)): sorted(n for n in imported(p) if n.startswith('moejax.tools'))
         for p in core}
  assert not {k: v for k, v in bad.items() if v}
