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
import os
from typing import List

from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from fixclip_jax import cli
from fixclip_jax import config_base
from fixclip_jax import train

DEFAULT_CONFIG = "demo"
MODES = ("train_and_eval", "train", "eval")

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

def _config_value_index(argv: List[str]) -> int:
  """Index of the argument holding --config's value (-1 when absent)."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(("--config=", "-config=")):
      return i
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return i + 1
  return -1


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


def resolve_config_argv(argv: List[str]) -> List[str]:
  """argv with --config's value made a file path (a bare name is looked up
  among the packaged configs; no --config means the demo), after checking
  that every --config.key override names a knob. Raises cli.UserError."""
  argv = list(argv)
  index = _config_value_index(argv)
  if index < 0:  # before any override: ml_collections wants --config first
    argv.insert(1, f"--config={DEFAULT_CONFIG}")
    index = 1
  prefix, value = "", argv[index]
  if value.startswith("-"):
    prefix, value = value.split("=", 1)[0] + "=", value.split("=", 1)[1]
  name, colon, args = value.partition(":")
  try:
    path = config_base.resolve_config_file(name)
    config = config_base.load_config_file(path) if not colon else None
  except FileNotFoundError as e:
    raise cli.UserError(f"--config={value}: {e}") from e
  argv[index] = prefix + path + colon + args
  if config is not None:  # a parameterised config's keys depend on its args
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
  flags.DEFINE_enum("mode", "train_and_eval", list(MODES), "What to run.")
  flags.mark_flag_as_required("workdir")


# ----------------------------------------------------------------------------
# The run.

def config_summary(config: ml_collections.ConfigDict, name: str, mode: str,
                   workdir: str) -> str:
  """One line: which config, what model and objective, how long, where."""
  steps = (f"{config.num_train_steps} steps x batch {config.data.global_batch}"
           if mode != "eval" else "evaluation only")
  start = f", from {config.init_from}" if config.init_from else ""
  return (f"Config {name}: {config.model_name} model, objective "
          f"{config.objective}, {config.model.context_length}-token text, "
          f"{steps}{start} -> {workdir} (full config: "
          f"{os.path.join(workdir, train.CONFIG_FILE)})")


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir
  mode = flags.FLAGS.mode
  maybe_initialize_distributed(config.distributed)
  process = jax.process_index()
  cli.log_to_file(os.path.join(workdir, cli.LOG_FILE if process == 0 else
                               f"log_process{process}.txt"))
  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__,
               process, jax.process_count(), jax.devices())
  logging.info("Config:\n%s", config)
  if process == 0:
    name = os.path.splitext(os.path.basename(
        flags.FLAGS["config"].config_filename))[0]
    print(config_summary(config, name, mode, workdir), flush=True)
  if mode == "eval":
    train.evaluate_checkpoint(config, workdir)
  else:
    train.train_and_evaluate(config, workdir, evaluate=mode == "train_and_eval")


if __name__ == "__main__":
  define_flags()
  cli.run(main, rewrite_argv=resolve_config_argv)
