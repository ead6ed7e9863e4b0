"""The package's import structure: no cycles, no hidden imports.

Imports flow one way (WORKSPACE.md): entry points -> train/eval -> model,
losses, data -> utilities. A function-level import is allowed only for an
optional heavy dependency, with a comment on its line saying so.
"""
import ast
import os

from absl.testing import absltest

PACKAGE = "fixclip_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)
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


def imported_names(node):
  """Absolute module names an Import/ImportFrom node brings in."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if node.level:
    raise AssertionError(f"relative import at line {node.lineno}: use absolute")
  # `from fixclip_jax import train` imports the module fixclip_jax.train.
  return [node.module] + [f"{node.module}.{a.name}" for a in node.names]


def import_graph(files):
  """{module: set of package modules it imports (anywhere in the file)}."""
  graph = {}
  for name, path in files.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        deps.update(n for n in imported_names(node) if n in files and n != name)
    # A package's __init__ is imported with any of its modules; ignore that edge.
    graph[name] = deps
  return graph


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
