"""What every command-line program of the package shares.

`run(main)` replaces `absl.app.run(main)`:

* Errors a user can cause (an unknown or badly typed flag, a wrong `--mode`, a
  missing required flag, a config key typo, a missing file or folder, a bad
  value: `USER_ERRORS` raised by `main`, or `UserError` raised while parsing
  flags) print one line `PROGRAM: error: MESSAGE` to stderr and exit with
  status 2 (or the exception's `exit_code`: 3 for a run that stopped itself,
  train.DivergenceError), without a traceback. `--debug` (or FIXCLIP_DEBUG=1)
  lets the exception through, traceback included.
* A quiet console: stderr shows warnings and errors only. INFO logs, ours and
  the libraries' (orbax, grain, jax), go to the file a program names with
  `log_to_file` (main.py: WORKDIR/log.txt). `--debug` shows them on stderr too.
  What a user should read (progress, results, output paths) is printed to
  stdout by the programs themselves. Console records are one line each
  (tracebacks and a message's further lines stay in the log file), and a
  log file that cannot be written (a full disk) is given up with one warning
  instead of a "--- Logging error ---" block per record. A failed save's
  late write callbacks (tensorstore's, after orbax's event loop closed) are
  logged there too, not printed as tracebacks (`sys.unraisablehook`).

The installed commands (pyproject.toml [project.scripts]) run the package's
modules as `python -m MODULE` does, so `fixclip-train --help` and
`python -m fixclip_jax.main --help` are the same program.
"""
import logging
import os
import runpy
import sys
from typing import Callable, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging

DEBUG_ENV = "FIXCLIP_DEBUG"
EXIT_USER_ERROR = 2
LOG_FILE = "log.txt"

_program = ""  # the installed command's name (run_module sets it), for error lines


class UserError(Exception):
  """A mistake in the command line, worded for the user (one line)."""


# Exceptions of `main` that are the user's input rather than a bug: files and
# folders that are missing or in the way (OSError), values and checkpoints
# that do not fit (ValueError, torch_files.CheckpointError), usage mistakes.
USER_ERRORS = (UserError, app.UsageError, OSError, ValueError)


def debug_requested(argv: Sequence[str] = ()) -> bool:
  """--debug on the command line (also before flags are parsed) or FIXCLIP_DEBUG=1."""
  if os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes"):
    return True
  if flags.FLAGS.is_parsed() and "debug" in flags.FLAGS:
    return flags.FLAGS.debug
  return any(a in ("--debug", "--debug=true", "--debug=1") for a in argv)


def one_line(message: object) -> str:
  """The message with its whitespace (newlines included) collapsed."""
  return " ".join(str(message).split())


def program_name() -> str:
  """The installed command's name, else the module's (python -m), else argv[0]."""
  if _program:
    return _program
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name:
    return spec.name
  return os.path.basename(sys.argv[0] or "fixclip")


def fail(message: object, program: Optional[str] = None,
         code: int = EXIT_USER_ERROR) -> None:
  """Prints `PROGRAM: error: MESSAGE` on one line and exits with `code`."""
  program = program or program_name()
  hint = f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
  sys.stderr.write(f"{program}: error: {one_line(message)}{hint}\n")
  sys.stderr.flush()
  sys.exit(code)


def reject_positional_arguments(argv: Sequence[str]) -> None:
  """A program's `main(argv)` first: its options are all --flags, so anything
  left in argv after the program name is a mistake (UserError: one line,
  exit 2 under `run`)."""
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {' '.join(argv[1:])!r}: every "
                    "option is a --flag (--help lists them)")


# ----------------------------------------------------------------------------
# Logging: a quiet console, everything in a file.

# Libraries whose records stay off the console (the log file has them): what
# orbax reports from its background save threads comes back whole as the
# one-line error of the save that failed (checkpoint.CheckpointSaveError).
_FILE_ONLY_LIBRARIES = (f"{os.sep}orbax{os.sep}",)


class _ConsoleFilter(logging.Filter):
  """Lets warnings and errors through; INFO only in debug mode."""

  def __init__(self, verbose: bool):
    super().__init__()
    self.verbose = verbose

  def filter(self, record: logging.LogRecord) -> bool:
    if self.verbose:
      return True
    if any(lib in (record.pathname or "") for lib in _FILE_ONLY_LIBRARIES):
      return False
    return record.levelno >= logging.WARNING


_console_filter = _ConsoleFilter(verbose=False)


class _OneLineFormatter(absl_logging.PythonFormatter):
  """absl's console format, one line a record: a library's error in a
  background thread (orbax on a full disk) prints its message's first line,
  not pages of tracebacks; the log file keeps them whole."""

  def __init__(self):
    super().__init__()
    self.verbose = False

  def format(self, record: logging.LogRecord) -> str:
    if self.verbose:
      return super().format(record)
    saved = record.exc_info, record.exc_text, record.stack_info
    # The traceback is formatted (and cached on the record) by the file's
    # handler, not here: hide it for this format only.
    record.exc_info = record.exc_text = record.stack_info = None
    try:
      lines = super().format(record).splitlines() or [""]
    finally:
      record.exc_info, record.exc_text, record.stack_info = saved
    more = len(lines) > 1 or saved[0] is not None
    return lines[0] + (" [...]" if more else "")


_console_formatter = _OneLineFormatter()


def _is_closed_loop_callback(unraisable) -> bool:
  """tensorstore's completion callback of a write that finished after
  orbax's event loop closed (the rest of a save that failed: a full disk)."""
  error = unraisable.exc_value
  return (unraisable.object is None and isinstance(error, RuntimeError) and
          str(error) == "Event loop is closed")


def _unraisable_to_log(unraisable) -> None:
  """sys.unraisablehook: a failed save's late write callbacks go to the log
  file, not to stderr (was a traceback per array, ~130, around the one
  error line, depending on thread timing); anything else prints as usual."""
  if _console_filter.verbose or not _is_closed_loop_callback(unraisable):
    sys.__unraisablehook__(unraisable)
    return
  logging.getLogger(__name__).info(
      "A write callback ran after its event loop closed (a failed save)",
      exc_info=(unraisable.exc_type, unraisable.exc_value,
                unraisable.exc_traceback))


def quiet_console(verbose: bool = False) -> None:
  """Keeps INFO logs off stderr (absl's handler), and each record to one
  line, unless `verbose`."""
  _console_filter.verbose = verbose
  _console_formatter.verbose = verbose
  sys.unraisablehook = _unraisable_to_log
  handler = absl_logging.get_absl_handler()
  if _console_filter not in handler.filters:
    handler.addFilter(_console_filter)
  handler.setFormatter(_console_formatter)


class _LogFileHandler(logging.FileHandler):
  """A FileHandler that gives up once its file cannot be written (a full or
  read-only disk): one warning on stderr, not a traceback per record."""

  def handleError(self, record: logging.LogRecord) -> None:
    error = sys.exc_info()[1]
    logging.getLogger().removeHandler(self)
    try:
      self.close()
    except OSError:
      pass
    sys.stderr.write(f"{program_name()}: warning: stopped writing "
                     f"{self.baseFilename}: {one_line(error)}\n")


def log_to_file(path: str) -> Optional[logging.Handler]:
  """Appends every INFO+ log record (all libraries) to the local file `path`.

  Lines look like absl's ("I1125 18:48:35.298 main.py:65] ..."). A URL
  (gs://...) gets no log file: object stores cannot append; None is returned.
  """
  if "://" in path:
    absl_logging.info("No %s for a remote workdir (%s)", LOG_FILE, path)
    return None
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Appended record by record, like metrics.jsonl, so not an atomic write.
  handler = _LogFileHandler(path, mode="a", encoding="utf-8")
  handler.setFormatter(absl_logging.PythonFormatter())
  handler.setLevel(logging.INFO)
  logging.getLogger().addHandler(handler)
  return handler


# ----------------------------------------------------------------------------
# The wrapper around absl.app.run.

ArgvRewrite = Callable[[List[str]], List[str]]


def _define_debug_flag() -> None:
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, "Show Python tracebacks and every "
                      f"library's INFO log on the console (also {DEBUG_ENV}=1).")


def _parse_flags(argv: List[str]) -> List[str]:
  """absl's flag parsing, with its errors (and UserError) as one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, UserError) as e:
    if debug_requested(argv):
      raise
    fail(e)
  return []  # not reached


def _guarded(main: Callable[[List[str]], None]) -> Callable[[List[str]], None]:
  def run_main(argv):
    quiet_console(verbose=debug_requested(argv))
    try:
      return main(argv)
    except USER_ERRORS as e:
      if debug_requested(argv):
        raise
      fail(e, code=getattr(e, "exit_code", EXIT_USER_ERROR))
  return run_main


def run(main: Callable[[List[str]], None],
        rewrite_argv: Optional[ArgvRewrite] = None) -> None:
  """absl.app.run(main) with one-line user errors and a quiet console.

  `rewrite_argv(argv) -> argv` runs before flags are parsed (main.py turns a
  bare `--config=NAME` into the packaged config's path there) and may raise
  UserError.
  """
  _define_debug_flag()
  argv = list(sys.argv)
  quiet_console(verbose=debug_requested(argv))
  if rewrite_argv is not None:
    try:
      argv = rewrite_argv(argv)
    except UserError as e:
      if debug_requested(argv):
        raise
      fail(e)
    sys.argv[:] = argv  # ml_collections reads config overrides from sys.argv
  app.run(_guarded(main), argv=argv, flags_parser=_parse_flags)


# ----------------------------------------------------------------------------
# Installed commands: `fixclip-NAME` runs `python -m MODULE`.

COMMANDS = {
    "train": "fixclip_jax.main",
    "convert": "fixclip_jax.convert",
    "embed": "fixclip_jax.embed",
    "prepare": "fixclip_jax.data.prepare",
    "synthetic": "fixclip_jax.data.make_synthetic",
    "caption": "fixclip_jax.tools.caption",
    "bench": "fixclip_jax.tools.bench",
    "data_bench": "fixclip_jax.tools.data_bench",
    "tokenizer_bench": "fixclip_jax.tools.tokenizer_bench",
    "ablate": "fixclip_jax.tools.ablate",
    "eval": "fixclip_jax.eval_cli",
}


def run_module(module: str) -> None:
  """Runs `module` as the program, exactly as `python -m module`."""
  global _program
  _program = os.path.basename(sys.argv[0])  # runpy replaces argv[0] with the file
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def train():
  run_module(COMMANDS["train"])


def convert():
  run_module(COMMANDS["convert"])


def embed():
  run_module(COMMANDS["embed"])


def prepare():
  run_module(COMMANDS["prepare"])


def synthetic():
  run_module(COMMANDS["synthetic"])


def caption():
  run_module(COMMANDS["caption"])


def bench():
  run_module(COMMANDS["bench"])


def data_bench():
  run_module(COMMANDS["data_bench"])


def tokenizer_bench():
  run_module(COMMANDS["tokenizer_bench"])


def ablate():
  run_module(COMMANDS["ablate"])


def evaluate():
  run_module(COMMANDS["eval"])
