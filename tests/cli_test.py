"""cli.py's one way to refuse stray positional arguments: one line, exit 2,
used first by every program's `main`."""
import ast
import os
import subprocess
import sys

from absl.testing import absltest

from fixclip_jax import cli
from tests import import_graph_test

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_call_of_main(path: str) -> str:
  """`module.function` that the top-level `main`'s first statement calls ('' if none)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
  body = [n for n in main.body
          if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
  call = body[0].value if isinstance(body[0], ast.Expr) else None
  if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
    return ""
  return ast.unparse(call.func)


class RejectPositionalArgumentsTest(absltest.TestCase):

  def test_program_name_alone_passes(self):
    cli.reject_positional_arguments(["prog"])

  def test_stray_arguments_are_one_line_naming_them(self):
    with self.assertRaises(cli.UserError) as caught:
      cli.reject_positional_arguments(["prog", "extra", "--not-a-flag-value"])
    message = str(caught.exception)
    self.assertEqual(message, "unexpected arguments 'extra --not-a-flag-value': "
                     "every option is a --flag (--help lists them)")
    self.assertNotIn("\n", message)

  def test_every_program_main_starts_with_it(self):
    files = import_graph_test.module_files()
    programs = sorted(import_graph_test.cli_modules(files))
    self.assertGreater(len(programs), 10)
    others = {m: first_call_of_main(files[m]) for m in programs}
    others = {m: c for m, c in others.items() if c != "cli.reject_positional_arguments"}
    self.assertEqual(others, {}, "mains that do not begin with "
                     "cli.reject_positional_arguments(argv)")

  def test_a_program_given_a_stray_argument_exits_2_with_one_line(self):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop(cli.DEBUG_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.tools.device_check", "stray"],
        cwd=_REPO, env=env, capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, cli.EXIT_USER_ERROR, proc.stderr)
    self.assertEqual(proc.stderr.splitlines(), [
        "fixclip_jax.tools.device_check: error: unexpected arguments 'stray': "
        "every option is a --flag (--help lists them) "
        f"(--debug or {cli.DEBUG_ENV}=1 shows the traceback)"])
    self.assertEqual(proc.stdout, "")


if __name__ == "__main__":
  absltest.main()
