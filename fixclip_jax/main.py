"""Entry point: python -m fixclip_jax.main --config=configs/NAME.py --workdir=DIR.

  --mode=train_and_eval (default) | train | eval
  --config.key=value overrides any knob (fixclip_jax/config_base.py lists them).
In eval mode the model comes from config.init_from, else from the latest
training checkpoint in WORKDIR.
"""
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from fixclip_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/demo.py", "Config file with get_config().",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics "
                               "and results go (a bucket path works on TPU).")
_MODE = flags.DEFINE_enum("mode", "train_and_eval",
                          ["train_and_eval", "train", "eval"], "What to run.")

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


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if not workdir:
    raise app.UsageError("--workdir is required")
  maybe_initialize_distributed(config.distributed)
  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.devices())
  logging.info("Config:\n%s", config)
  if _MODE.value == "eval":
    train.evaluate_checkpoint(config, workdir)
  else:
    train.train_and_evaluate(config, workdir,
                             evaluate=_MODE.value == "train_and_eval")


if __name__ == "__main__":
  app.run(main)
