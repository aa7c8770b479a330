"""The import direction of docs/architecture.md, checked on every module of byol_jax.

The ```imports block of docs/architecture.md is the rule and its only copy: each line names
a part of the package and the parts it may import. A module's part is its subpackage
(byol_jax/store/files.py -> store) or, for a top-level module, its own name (config, cli,
__init__, ...). Modules are read with `ast`, never imported, so these tests need no jax.
"""
import ast
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "byol_jax"
PACKAGE_DIR = ROOT / PACKAGE
DOC = ROOT / "docs" / "architecture.md"
_BLOCK = re.compile(r"^```imports[ \t]*\n(.*?)^```", re.M | re.S)
# The mark that lets a function-local import stand: a heavy dependency the package can run
# without, e.g. `import torch  # optional: only the torchvision export needs it`.
_OPTIONAL = re.compile(r"#\s*optional:\s*\S")
_DYNAMIC = ("import_module", "__import__")


def parse_rules(text: str) -> dict[str, frozenset[str]]:
  """The ```imports block of `text` as {part: the parts it may import}."""
  blocks = _BLOCK.findall(text)
  if len(blocks) != 1:
    raise ValueError(f"docs/architecture.md must hold exactly one ```imports block, found "
                     f"{len(blocks)}; it is the rule these tests read.")
  rules = {}
  for number, line in enumerate(blocks[0].splitlines(), 1):
    if not line.strip():
      continue
    part, colon, allowed = line.partition(":")
    part = part.strip()
    if not colon or not part or " " in part:
      raise ValueError(f"```imports line {number} {line!r}: write 'part: allowed parts'.")
    if part in rules:
      raise ValueError(f"```imports names {part!r} twice; merge its lines into one.")
    rules[part] = frozenset(allowed.split())
  return rules


def package_parts(package_dir: pathlib.Path = PACKAGE_DIR) -> set[str]:
  """The subpackages and top-level modules of the package."""
  return ({p.stem for p in package_dir.glob("*.py")} |
          {p.parent.name for p in package_dir.glob("*/__init__.py")})


def module_paths() -> list[str]:
  """Every module of the package, as paths relative to byol_jax/ ('store/files.py')."""
  return sorted(p.relative_to(PACKAGE_DIR).as_posix() for p in PACKAGE_DIR.rglob("*.py"))


def part_of(relpath: str) -> str:
  """'store/files.py' -> 'store'; 'cli.py' -> 'cli'; '__init__.py' -> '__init__'."""
  path = pathlib.PurePosixPath(relpath)
  return path.parts[0] if len(path.parts) > 1 else path.stem


def _resolve(node: ast.ImportFrom, relpath: str) -> str:
  """The absolute module a `from ... import` reads from (relative imports resolved)."""
  if not node.level:
    return node.module or ""
  path = pathlib.PurePosixPath(relpath)
  package = [PACKAGE, *path.parent.parts]  # An __init__.py is its package: same parent.
  base = package[:len(package) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _target_parts(node: ast.AST, relpath: str, parts: set[str]) -> list[str]:
  """The parts of byol_jax an import statement (or a constant-string dynamic import) reads;
  '__init__' for the package itself."""
  if isinstance(node, ast.Import):
    names = [alias.name for alias in node.names]
  elif isinstance(node, ast.ImportFrom):
    base = _resolve(node, relpath)
    if base == PACKAGE:  # `from byol_jax import store`: the names may be parts.
      return [a.name if a.name in parts else "__init__" for a in node.names]
    names = [base]
  else:  # importlib.import_module("byol_jax.x") / __import__("byol_jax.x").
    names = [node.args[0].value]
  return [(n.split(".") + ["__init__"])[1] for n in names
          if n == PACKAGE or n.startswith(PACKAGE + ".")]


def _is_dynamic_import(node: ast.AST) -> bool:
  return isinstance(node, ast.Call) and (
      getattr(node.func, "attr", None) in _DYNAMIC or getattr(node.func, "id", None) in _DYNAMIC)


def _walk_with_scope(node: ast.AST, local: bool = False):
  """Yields (node, inside a function) for every node below `node`."""
  for child in ast.iter_child_nodes(node):
    yield child, local
    inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    yield from _walk_with_scope(child, inner)


def _statement(source: str, node: ast.AST) -> str:
  return (ast.get_source_segment(source, node) or "").splitlines()[0].strip()


def check_imports(source: str, relpath: str, rules: dict[str, frozenset[str]],
                  parts: set[str]) -> list[str]:
  """Imports of `source` (the module byol_jax/`relpath`) that the rules forbid, one line
  each naming the module, the line, the forbidden part and what the rule allows."""
  part = part_of(relpath)
  allowed = rules.get(part, frozenset()) | {part}
  problems = []
  for node, _ in _walk_with_scope(ast.parse(source)):
    if _is_dynamic_import(node) and not (
        node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      problems.append(f"byol_jax/{relpath}:{node.lineno}: a dynamic import the check cannot "
                      f"read ({_statement(source, node)}); import the module by name.")
      continue
    if not isinstance(node, (ast.Import, ast.ImportFrom)) and not _is_dynamic_import(node):
      continue
    for target in _target_parts(node, relpath, parts):
      if target not in allowed:
        problems.append(
            f"byol_jax/{relpath}:{node.lineno}: {part} may not import {target} "
            f"({_statement(source, node)}); docs/architecture.md allows {part}: "
            f"{' '.join(sorted(rules.get(part, ()))) or '(nothing)'}")
  return problems


def _top_level_names(node: ast.AST, relpath: str) -> set[str] | None:
  """The top-level packages an import statement or a constant-string dynamic import reads;
  None for a node that is neither."""
  if isinstance(node, ast.Import):
    return {alias.name.split(".")[0] for alias in node.names}
  if isinstance(node, ast.ImportFrom):
    return {_resolve(node, relpath).split(".")[0]}
  if (_is_dynamic_import(node) and node.args and isinstance(node.args[0], ast.Constant)
      and isinstance(node.args[0].value, str)):
    name = node.args[0].value
    return {PACKAGE if name.startswith(".") else name.split(".")[0]}
  return None


def unmarked_local_imports(source: str, relpath: str) -> list[str]:
  """Function-local imports of byol_jax or third-party modules without an
  '# optional: <reason>' comment on their line (standard-library imports are not listed)."""
  lines = source.splitlines()
  problems = []
  for node, local in _walk_with_scope(ast.parse(source)):
    tops = _top_level_names(node, relpath) if local else None
    if tops is None:
      continue
    if tops <= set(sys.stdlib_module_names) or _OPTIONAL.search(lines[node.lineno - 1]):
      continue
    problems.append(f"byol_jax/{relpath}:{node.lineno}: function-local import "
                    f"({_statement(source, node)}); move it to the top of the module, or, for "
                    "an optional heavy dependency, end its line with '# optional: <reason>'.")
  return problems


@pytest.fixture(scope="module")
def rules():
  return parse_rules(DOC.read_text())


def test_every_part_of_the_package_has_a_rule_and_rules_name_only_real_parts(rules):
  parts = package_parts()
  named = set(rules) | set().union(*rules.values())
  assert not parts - set(rules), (
      f"parts without a line in docs/architecture.md's ```imports block: "
      f"{sorted(parts - set(rules))}; add one naming what each may import.")
  assert not named - parts, (
      f"docs/architecture.md's ```imports block names {sorted(named - parts)}, which are not "
      "parts of byol_jax; fix the spelling or remove the stale rule.")


def test_every_module_imports_only_the_parts_its_rule_allows(rules):
  parts = package_parts()
  problems = [p for relpath in module_paths()
              for p in check_imports((PACKAGE_DIR / relpath).read_text(), relpath, rules, parts)]
  assert not problems, "imports against docs/architecture.md:\n" + "\n".join(problems)


def test_function_local_imports_are_only_marked_optional_dependencies():
  problems = [p for relpath in module_paths()
              for p in unmarked_local_imports((PACKAGE_DIR / relpath).read_text(), relpath)]
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source", [
    "from byol_jax.jobs import loop\n",
    "import byol_jax.jobs.loop\n",
    "from byol_jax import jobs\n",
    "from ..jobs import loop\n",
    "def f():\n  from byol_jax.jobs import loop\n",
    "import importlib\nimportlib.import_module('byol_jax.jobs.loop')\n",
])
def test_a_planted_wrong_way_import_is_reported_with_module_line_and_part(rules, source):
  problems = check_imports(source, "model/planted.py", rules, package_parts())
  line = source.count("\n", 0, source.index("jobs")) + 1
  assert len(problems) == 1 and problems[0].startswith(f"byol_jax/model/planted.py:{line}: ")
  assert "model may not import jobs" in problems[0]


@pytest.mark.parametrize("source", [
    "from byol_jax import config\n",  # model: config.
    "from byol_jax.model import layers\nfrom . import resnet\n",  # Its own part.
    "import numpy\nimport byol_jax_other\n",  # Not byol_jax.
])
def test_imports_the_rule_allows_are_not_reported(rules, source):
  assert check_imports(source, "model/planted.py", rules, package_parts()) == []


def test_a_dynamic_import_of_a_computed_name_is_reported(rules):
  source = "import importlib\ndef f(name):\n  return importlib.import_module(f'byol_jax.{name}')\n"
  (problem,) = check_imports(source, "model/planted.py", rules, package_parts())
  assert problem.startswith("byol_jax/model/planted.py:3: a dynamic import")


@pytest.mark.parametrize("line, reported", [
    ("import numpy", True),
    ("from byol_jax.model import layers", True),
    ("from . import layers", True),
    ("import torch  # optional:", True),  # A mark without its reason.
    ("import torch  # optional: only the torchvision export needs it", False),
    ("import json", False),  # Standard library.
    ("return importlib.import_module('byol_jax.jobs')", True),
])
def test_a_function_local_import_is_reported_unless_marked_optional(line, reported):
  source = f"def f():\n  {line}\n"
  assert bool(unmarked_local_imports(source, "model/planted.py")) == reported


def test_the_package_states_its_public_api():
  tree = ast.parse((PACKAGE_DIR / "__init__.py").read_text())
  assert ast.get_docstring(tree), "byol_jax/__init__.py needs a docstring saying what users import."
  bound = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
           for alias in node.names}
  values = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}
  public = ast.literal_eval(values["__all__"])
  assert {"__version__", "load_encoder"} <= set(public) <= bound | set(values)
  setup_version = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
  assert ast.literal_eval(values["__version__"]) == setup_version


def test_a_doc_without_the_block_is_refused():
  with pytest.raises(ValueError, match="exactly one ```imports block"):
    parse_rules("# architecture\nno rules here\n")


# ------------------------------------------------------------------ the tests' own layout

TESTS_DIR = ROOT / "tests"
TEST_FILE_LINES = 400  # docs/architecture.md: "none is over ~400 lines".


def imported_test_modules(path: pathlib.Path) -> list[str]:
  """The `test_*` modules a tests/ file imports (by module name, as pytest puts its folder
  and tests/ on sys.path)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
             [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
    found += [n for n in names if n.split(".")[-1].startswith("test_")]
  return found


def test_no_test_file_imports_another_and_none_is_over_the_size():
  offending, long_files = [], []
  for path in sorted(TESTS_DIR.rglob("*.py")):
    if "fixtures" in path.relative_to(TESTS_DIR).parts:
      continue
    rel = path.relative_to(ROOT).as_posix()
    offending += [f"{rel}: imports {name}" for name in imported_test_modules(path)]
    if path.name.startswith("test_") and len(path.read_text().splitlines()) > TEST_FILE_LINES:
      long_files.append(rel)
  assert not offending, ("shared test code belongs in a helper module (tests/fakes.py, "
                         "tests/<part>/<name>.py), not in a test file: " + "; ".join(offending))
  assert not long_files, f"over {TEST_FILE_LINES} lines, split by behaviour: {long_files}"


def test_test_folders_are_the_packages_parts(rules):
  folders = {p.name for p in TESTS_DIR.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
  assert folders - {"learning"} <= package_parts(), folders - package_parts()
  assert not list(TESTS_DIR.rglob("__init__.py")), "tests/ folders are not packages"
