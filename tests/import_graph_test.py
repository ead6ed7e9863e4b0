"""The package's import structure: WORKSPACE.md's layer map, no cycles, no
hidden imports.

Imports flow one way: entry points -> train/eval -> model, losses, data ->
utilities. WORKSPACE.md's "Imports: the layer map" table says, for each
module, its layer and what it may import; this test reads that table (the one
map) and checks every import statement of the package against it (ast, no
code is run). A function-level import is allowed only for an optional heavy
dependency, with a comment on its line saying so.
"""
import ast
import fnmatch
import os
import re

from absl.testing import absltest

PACKAGE = "fixclip_jax"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, PACKAGE)
WORKSPACE = os.path.join(REPO, "WORKSPACE.md")
LAYER_MAP_HEADING = "## Imports: the layer map"
LAYERS = ("utils", "parts", "runs", "entry")  # lowest first; imports go down
CLI_MARK = "(CLI)"
# Optional dependencies: not needed to train, imported only where used.
OPTIONAL = ("torch", "transformers", "tensorflow", "tensorflow_datasets",
            "open_clip", "safetensors.torch", "diffusers", "wandb")


def module_files():
  """{module name: file path} of every module in the package."""
  out = {}
  for parent, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(parent, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def packages(files):
  """The modules that are packages (their __init__.py)."""
  return {name for name, path in files.items()
          if os.path.basename(path) == "__init__.py"}


def imported_modules(node, files):
  """The package modules an Import/ImportFrom node imports: `from a import b`
  is module a.b when that is a module, else a name of module a."""
  if isinstance(node, ast.Import):
    return {a.name for a in node.names if a.name in files}
  if node.level:
    raise AssertionError(f"relative import at line {node.lineno}: use absolute")
  found = set()
  for alias in node.names:
    submodule = f"{node.module}.{alias.name}"
    found.add(submodule if submodule in files else node.module)
  return found & set(files)


def import_graph(files):
  """{module: set of package modules it imports (anywhere in the file)}.

  A package's __init__ is imported with any of its modules; that edge is left
  out (test_package_inits_import_nothing_of_the_package checks they import nothing)."""
  inits = packages(files)
  graph = {}
  for name, path in files.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        deps |= imported_modules(node, files)
    graph[name] = deps - inits - {name}
  return graph


def cli_modules(files):
  """Modules with a top-level `main` function: programs run by `python -m`."""
  found = set()
  for name, path in files.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
      found.add(name)
  return found


# ----------------------------------------------------------------------------
# WORKSPACE.md's layer map.


def module_name(path):
  """`models/clip.py` -> fixclip_jax.models.clip; `tools/*` -> fixclip_jax.tools.*"""
  if not re.fullmatch(r"[a-z0-9_/]+(\.py|/\*)", path):
    raise ValueError(f"layer map: {path!r} is not a path like `dir/name.py` or `dir/*`")
  return PACKAGE + "." + path.removesuffix(".py").replace("/", ".")


def read_layer_map(text):
  """The rows of the table after LAYER_MAP_HEADING in `text`, each a dict:
  layer, modules (names or `dir.*` patterns), cli (names marked (CLI)),
  layers (the lower layers it may import), paths (names/patterns it may import)."""
  if LAYER_MAP_HEADING not in text:
    raise ValueError(f"WORKSPACE.md: no {LAYER_MAP_HEADING!r} section")
  section = text.split(LAYER_MAP_HEADING, 1)[1].splitlines()
  first = next((i for i, line in enumerate(section) if line.startswith("|")), 0)
  lines = []
  for line in section[first:]:  # the first table: its lines, up to a blank one
    if not line.startswith("|"):
      break
    lines.append(line)
  rows = []
  for line in lines[2:]:  # header and |---|
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) != 3:
      raise ValueError(f"layer map row has {len(cells)} cells, not 3: {line}")
    layer, modules, may_import = cells
    if layer not in LAYERS:
      raise ValueError(f"layer map: unknown layer {layer!r} (one of {LAYERS}): {line}")
    row = {"layer": layer, "modules": [], "cli": set(), "layers": set(), "paths": []}
    for item in (m.strip() for m in modules.split(",")):
      match = re.fullmatch(r"`([^`]+)`( \(CLI\))?", item)
      if not match:
        raise ValueError(f"layer map: {item!r} is not `path` or `path` {CLI_MARK}: {line}")
      row["modules"].append(module_name(match.group(1)))
      if match.group(2):
        row["cli"].add(row["modules"][-1])
    for item in (m.strip() for m in may_import.split(",")):
      if item == "nothing":
        continue
      if item.startswith("`") and item.endswith("`"):
        row["paths"].append(module_name(item[1:-1]))
      elif item in LAYERS:
        row["layers"].add(item)
      else:
        raise ValueError(f"layer map: {item!r} is neither a layer nor a `path`: {line}")
    rows.append(row)
  return rows


def workspace_layer_map():
  """The layer map WORKSPACE.md states (read_layer_map's rows)."""
  with open(WORKSPACE) as f:
    return read_layer_map(f.read())


def row_of_each_module(modules, rows):
  """{module: its row}: a row naming its path overrides a `dir/*` row.
  Raises ValueError for a module no row or two rows name."""
  found = {}
  for module in sorted(modules):
    exact = [r for r in rows if module in r["modules"]]
    pattern = [r for r in rows if any(fnmatch.fnmatchcase(module, m)
                                      for m in r["modules"] if m.endswith("*"))]
    candidates = exact or pattern
    if len(candidates) != 1:
      raise ValueError(f"layer map: {module} is in {len(candidates)} rows, "
                       "not exactly one")
    found[module] = candidates[0]
  return found


def layer_map_violations(graph, rows, clis):
  """'a imports b: why' for each import the layer map forbids."""
  rank = {layer: i for i, layer in enumerate(LAYERS)}
  row_of = row_of_each_module(graph, rows)
  found = []
  for module in sorted(graph):
    row = row_of[module]
    for dep in sorted(graph[module]):
      dep_layer = row_of[dep]["layer"]
      named = dep in row["paths"]
      matched = named or any(fnmatch.fnmatchcase(dep, p) for p in row["paths"]) \
          or dep_layer in row["layers"]
      why = None
      if rank[dep_layer] > rank[row["layer"]]:
        why = f"a {dep_layer} module from the {row['layer']} layer"
      elif not matched:
        why = "not in its row's \"may import\""
      elif dep in clis and not named:
        why = "a CLI module its row does not name by path"
      if why:
        found.append(f"{module} imports {dep}: {why}")
  return found


def find_cycle(graph):
  """One import cycle as a list of modules, or None."""
  state = {}

  def visit(node, stack):
    state[node] = "active"
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == "active":
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        cycle = visit(dep, stack)
        if cycle:
          return cycle
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node, [])
      if cycle:
        return cycle
  return None


def hidden_imports(files):
  """'file:line: statement' for each function-level import that is not of an
  optional dependency with a comment on its line saying "optional"."""
  found = set()
  for path in files.values():
    with open(path) as f:
      source = f.read()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source, path)):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for inner in ast.walk(node):
        if not isinstance(inner, (ast.Import, ast.ImportFrom)):
          continue
        names = [a.name for a in inner.names] if isinstance(inner, ast.Import) \
            else [inner.module]
        optional = all(n == o or n.startswith(o + ".") for n in names
                       for o in [next((o for o in OPTIONAL if n == o or
                                       n.startswith(o + ".")), "")])
        line = lines[inner.lineno - 1]
        comment = line.split("#", 1)[1] if "#" in line else ""
        if not optional or "optional" not in comment:
          found.add(f"{os.path.relpath(path, ROOT)}:{inner.lineno}: {line.strip()}")
  return sorted(found)


class ImportGraphTest(absltest.TestCase):

  def test_workspace_layer_map_names_every_module_once(self):
    files = module_files()
    rows = workspace_layer_map()
    modules = set(files) - packages(files)
    row_of = row_of_each_module(modules, rows)  # raises for none or two
    for row in rows:
      for pattern in row["modules"]:
        self.assertTrue(any(fnmatch.fnmatchcase(m, pattern) for m in modules),
                        f"layer map names {pattern}: no such module")
      for pattern in row["paths"]:
        self.assertTrue(any(fnmatch.fnmatchcase(m, pattern) for m in modules),
                        f"layer map: {pattern} (may import): no such module")
      for layer in row["layers"]:
        self.assertLess(LAYERS.index(layer), LAYERS.index(row["layer"]),
                        f"layer map: the {row['layer']} layer names the "
                        f"{layer} layer; a layer imports only lower layers by name")
    self.assertEqual(set(row_of), modules)

  def test_imports_follow_the_workspace_layer_map(self):
    files = module_files()
    graph = import_graph(files)
    inits = packages(files)
    graph = {m: deps for m, deps in graph.items() if m not in inits}
    violations = layer_map_violations(graph, workspace_layer_map(), cli_modules(files))
    self.assertEqual(violations, [], "imports WORKSPACE.md's layer map forbids "
                     "(fix the import, or the map if it is wrong):\n" +
                     "\n".join(violations))

  def test_cli_modules_are_the_entry_layer_and_those_marked(self):
    files = module_files()
    rows = workspace_layer_map()
    modules = set(files) - packages(files)
    row_of = row_of_each_module(modules, rows)
    marked = set().union(*(r["cli"] for r in rows))
    entry = {m for m in modules if row_of[m]["layer"] == "entry"}
    self.assertEqual(cli_modules(files) & modules, entry | marked)

  def test_package_inits_import_nothing_of_the_package(self):
    files = module_files()
    for name in packages(files):
      with open(files[name]) as f:
        tree = ast.parse(f.read())
      imports = set()
      for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          imports |= imported_modules(node, files)
      self.assertEqual(imports, set(), f"{name}/__init__.py")

  def test_layer_map_check_finds_what_a_map_forbids(self):
    rows = read_layer_map(LAYER_MAP_HEADING + """
| layer | modules | may import |
|---|---|---|
| entry | `main.py` | runs, utils |
| runs | `train.py` | parts, utils |
| parts | `step.py`, `models/*` | `models/*` |
| parts | `convert.py` (CLI) | utils |
| utils | `fileio.py` | nothing |
""")
    p = PACKAGE + "."
    ok = {p + "main": {p + "train", p + "fileio"}, p + "train": {p + "step"},
          p + "step": {p + "models.clip"}, p + "models.clip": set(),
          p + "convert": {p + "fileio"}, p + "fileio": set()}
    self.assertEqual(layer_map_violations(ok, rows, {p + "convert"}), [])
    bad = dict(ok)
    bad[p + "main"] = {p + "step"}                    # parts is not in its row
    bad[p + "models.clip"] = {p + "train"}            # up a layer
    bad[p + "train"] = {p + "step", p + "convert"}    # a CLI module, unnamed
    bad[p + "step"] = {p + "models.clip", p + "convert"}
    self.assertEqual(layer_map_violations(bad, rows, {p + "convert"}), [
        f"{p}main imports {p}step: not in its row's \"may import\"",
        f"{p}models.clip imports {p}train: a runs module from the parts layer",
        f"{p}step imports {p}convert: not in its row's \"may import\"",
        f"{p}train imports {p}convert: a CLI module its row does not name by path"])
    with self.assertRaisesRegex(ValueError, "fixclip_jax.losses is in 0 rows"):
      row_of_each_module({p + "losses"}, rows)
    with self.assertRaisesRegex(ValueError, "unknown layer 'model'"):
      read_layer_map(LAYER_MAP_HEADING + "\n|a|b|c|\n|-|-|-|\n| model | `x.py` | nothing |")

  def test_finds_a_cycle_when_there_is_one(self):
    self.assertEqual(find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}),
                     ["a", "b", "c", "a"])
    self.assertIsNone(find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}))

  def test_package_has_no_import_cycle(self):
    files = module_files()
    self.assertGreater(len(files), 20)
    cycle = find_cycle(import_graph(files))
    self.assertIsNone(cycle, f"import cycle: {' -> '.join(cycle or [])}")

  def test_no_hidden_imports(self):
    hidden = hidden_imports(module_files())
    self.assertEqual(hidden, [], "function-level imports of non-optional "
                     "modules (or without a comment):\n" + "\n".join(hidden))


if __name__ == "__main__":
  absltest.main()
