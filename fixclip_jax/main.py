"""Trains and evaluates a FIX-CLIP / Long-CLIP / CLIP model.

  fixclip-train --config=demo --workdir=/tmp/fixclip_demo
  python -m fixclip_jax.main --config=configs/fixclip_b16.py --workdir=DIR \\
      --config.init_from=/ckpt/b16_248 --config.data.path='/data/*.array_record'

  --config=NAME|PATH  a packaged config by name (demo, fixclip_b16, fixclip_l14,
                      longclip_b16, longclip_l14, clip_b16) or a config file.
  --config.key=value  overrides any knob (fixclip_jax/config_base.py lists them).
  --mode=train_and_eval (default) | train | eval
In eval mode the model comes from config.init_from, else from the latest
training checkpoint in WORKDIR. Rerunning with the same WORKDIR resumes
(`--config.resume_step=N` picks an earlier saved step). The method, and the
sections docstrings cite: docs/method.md.

The console shows one config line, progress and the results; everything else
(the full config, library logs) is in WORKDIR/config.json and WORKDIR/log.txt.
"""
import difflib
import logging as py_logging
from logging import handlers as py_log_handlers
import os
import traceback
from typing import List, Tuple

from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from fixclip_jax import cli
from fixclip_jax import config_base
from fixclip_jax import config_check
from fixclip_jax import train
from fixclip_jax.data import sources

DEFAULT_CONFIG = "demo"

# Environment variables that say this process is one of several.
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _is_multi_process() -> bool:
  if any(os.environ.get(v) for v in _MULTI_PROCESS_ENV):
    return True
  if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  # TPU pods: more than one worker host.
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize_distributed(mode: str) -> None:
  """jax.distributed.initialize() on multi-host runs (TPU pods, SLURM nodes,
  launch/local.sh).

  JAX reads the coordinator address and local device ids from the
  environment itself, but not the process count and id outside SLURM/TPU:
  launch/local.sh sets JAX_NUM_PROCESSES and JAX_PROCESS_ID for them.
  """
  if mode == "on" or (mode == "auto" and _is_multi_process()):
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
      kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
      kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)


# ----------------------------------------------------------------------------
# The command line: --config by name or path, overrides checked before parsing.

def _config_values(argv: List[str]) -> List[Tuple[int, str]]:
  """(index, text before the value) of each argument holding a --config
  value: ("--config=" for `--config=demo`, "" for `--config demo`)."""
  found = []
  for i, arg in enumerate(argv[1:], start=1):
    for flag in ("--config", "-config"):
      if arg.startswith(flag + "="):
        found.append((i, flag + "="))
      elif arg == flag and i + 1 < len(argv):
        found.append((i + 1, ""))
  return found


def _resolve_config_value(value: str) -> str:
  """NAME or PATH[:args] -> the config file's PATH[:args]."""
  name, colon, args = value.partition(":")
  try:
    return config_base.resolve_config_file(name) + colon + args
  except FileNotFoundError as e:
    raise cli.UserError(f"--config={value}: {e}") from e


def _unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str:
  """'' if the dotted `key` names a knob of `config`, else why not."""
  node, walked = config, []
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return f"--config.{key}: {'.'.join(walked)} is a value, not a section"
    if part not in node:
      close = difflib.get_close_matches(part, list(node.keys()), n=1)
      hint = f" (did you mean {'.'.join(walked + close)}?)" if close else ""
      return f"--config.{key}: no such config key{hint}"
    node, walked = node[part], walked + [part]
  return ""


def _override_keys(argv: List[str]) -> List[str]:
  keys = []
  for arg in argv[1:]:
    for prefix in ("--config.", "-config.", "--noconfig.", "-noconfig."):
      if arg.startswith(prefix):
        keys.append(arg[len(prefix):].split("=", 1)[0])
  return keys


def _load_config_file(path: str) -> ml_collections.ConfigDict:
  """The config file's get_config(); its errors (a value of the wrong type for
  a knob, a typo) as one line naming the file and line."""
  try:
    return config_base.load_config_file(path)
  except Exception as e:  # pylint: disable=broad-except  # the user's code
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if os.path.abspath(f.filename) == os.path.abspath(path)]
    where = f"{path}, line {lines[-1]}" if lines else path
    raise cli.UserError(f"--config={where}: {type(e).__name__}: {e}") from e


def resolve_config_argv(argv: List[str]) -> List[str]:
  """argv with --config's value made a file path (a bare name is looked up
  among the packaged configs; no --config means the demo), after checking
  that every --config.key override names a knob. Raises cli.UserError."""
  argv = list(argv)
  values = _config_values(argv)
  if not values:  # before any override: ml_collections wants --config first
    argv.insert(1, f"--config={DEFAULT_CONFIG}")
    values = [(1, "--config=")]
  for i, prefix in values:
    argv[i] = prefix + _resolve_config_value(argv[i][len(prefix):])
  last, prefix = values[-1]
  path = argv[last][len(prefix):]
  if ":" not in path:  # a parameterised config's keys depend on its args
    config = _load_config_file(path)
    for key in _override_keys(argv):
      message = _unknown_key_message(config, key)
      if message:
        raise cli.UserError(message)
  return argv


def define_flags():
  """The CLI's flags (defined only when run as a program: no clash on import)."""
  config_flags.DEFINE_config_file(
      "config", None, "A packaged config's name (demo, fixclip_b16, ...) or a "
      "config file with get_config(); default: demo.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, logs and "
                      "results go (a bucket path works on TPU).")
  flags.DEFINE_enum("mode", "train_and_eval", list(config_check.MODES),
                    "What to run.")
  flags.mark_flag_as_required("workdir")


# ----------------------------------------------------------------------------
# The run.

def resolve_train_steps(config: ml_collections.ConfigDict, mode: str) -> None:
  """config.num_train_epochs > 0 sets config.num_train_steps from the training
  source's length (config_base.steps_for_epochs), before the config is
  checked and recorded; eval mode trains nothing."""
  epochs, batch = config.num_train_epochs, config.data.global_batch
  if mode == "eval" or epochs <= 0 or batch < 1:  # < 0: check_config says why
    return
  try:
    pairs = sources.source_length(config.data)
    steps = config_base.steps_for_epochs(epochs, pairs, batch)
  except (OSError, ValueError) as e:
    raise cli.UserError(
        f"config.num_train_epochs={epochs:g} counts the training pairs of "
        f"config.data.path={config.data.path!r} (data.type="
        f"{config.data.type}): {e}") from e
  logging.info("num_train_epochs=%g: %d pairs at global batch %d -> %d steps",
               epochs, pairs, batch, steps)
  config.num_train_steps = steps


def config_summary(config: ml_collections.ConfigDict, name: str, mode: str,
                   workdir: str) -> str:
  """One line: which config, what model and objective, how long, where."""
  steps = (f"{config.num_train_steps} steps x batch {config.data.global_batch}"
           if mode != "eval" else "evaluation only")
  if mode != "eval" and config.num_train_epochs > 0:
    steps += f" ({config.num_train_epochs:g} epochs)"
  start = f", from {config.init_from}" if config.init_from else ""
  if mode != "eval" and config.pretrain77.steps:
    start = f", after {config.pretrain77.steps} steps of a 77-token CLIP start"
  return (f"Config {name}: {config.model_name} model, objective "
          f"{config.objective}, {config.model.context_length}-token text, "
          f"{steps}{start} -> {workdir} (full config: "
          f"{os.path.join(workdir, train.CONFIG_FILE)})")


def log_file_opener(workdir: str, process: int):
  """Holds log records in memory until the run's checks pass, then opens
  WORKDIR/log.txt (process 0; log_processN.txt on the others) with them: a
  user error leaves the workdir as it was. Returns the opener."""
  held = py_log_handlers.MemoryHandler(capacity=1 << 30,
                                       flushLevel=py_logging.CRITICAL + 1)
  held.setLevel(py_logging.INFO)
  py_logging.getLogger().addHandler(held)

  def open_log():
    py_logging.getLogger().removeHandler(held)
    handler = cli.log_to_file(os.path.join(
        workdir, cli.LOG_FILE if process == 0 else f"log_process{process}.txt"))
    if handler is not None:
      held.setTarget(handler)
      held.flush()
    held.close()

  return open_log


def main(argv):
  cli.reject_positional_arguments(argv)
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir
  mode = flags.FLAGS.mode
  maybe_initialize_distributed(config.distributed)
  process = jax.process_index()
  # Config errors end here, in one line, before anything is written.
  resolve_train_steps(config, mode)
  config_check.check_config(config, mode)
  open_log = log_file_opener(workdir, process)
  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__,
               process, jax.process_count(), jax.devices())
  logging.info("Config:\n%s", config)
  if process == 0:
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    name = os.path.splitext(os.path.basename(path.split(":")[0]))[0]
    summary = config_summary(config, name, mode, workdir)
    logging.info("%s", summary)
    print(summary, flush=True)
  # train.py checks the workdir and init_from, then opens the log.
  if mode == "eval":
    train.evaluate_checkpoint(config, workdir, on_start=open_log)
  else:
    train.train_and_evaluate(config, workdir, evaluate=mode == "train_and_eval",
                             on_start=open_log)


if __name__ == "__main__":
  define_flags()
  cli.run(main, rewrite_argv=resolve_config_argv)
