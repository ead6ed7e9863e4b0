"""Checkpoints on disk.

Model checkpoints (this part): a directory that holds a model's parameters and
the CLIPConfig that fixes their shapes, so a model can be rebuilt from the
directory alone:

  DIR/
    model_config.json   the CLIPConfig fields as JSON
    params/             orbax (StandardCheckpointer) pytree of float32 arrays

`save_model` writes into a temporary directory next to DIR and renames it
into place, so a failed or interrupted save never leaves a half-written DIR.
"""
import json
import os
from typing import Tuple

from absl import logging
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from fixclip_jax import fileio
from fixclip_jax.models.sizes import CLIPConfig
from fixclip_jax.models.sizes import config_from_dict
from fixclip_jax.models.sizes import config_to_dict
from fixclip_jax.params import check_params

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_SUBDIR = "params"


def is_model_dir(path: str) -> bool:
  """True if `path` looks like a directory written by `save_model`."""
  root = fileio.path(path)
  return (fileio.isfile(root / MODEL_CONFIG_FILE) and
          fileio.isdir(root / PARAMS_SUBDIR))


def save_model(path: str, params: dict, cfg: CLIPConfig, *,
               overwrite: bool = False) -> None:
  """Writes params (float32, moved to host) and cfg to the directory `path`."""
  path = fileio.absolute(path)
  fileio.refuse_existing(path, overwrite)
  check_params(params, cfg, f"save_model({path})")
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  with fileio.atomic_directory(path, overwrite=overwrite) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_SUBDIR), host)
    fileio.atomic_write(os.path.join(tmp, MODEL_CONFIG_FILE),
                        json.dumps(config_to_dict(cfg), indent=2))
  logging.info("Saved model checkpoint to %s", path)


def load_model_config(path: str) -> CLIPConfig:
  cfg_file = fileio.path(path) / MODEL_CONFIG_FILE
  if not fileio.isfile(cfg_file):
    raise FileNotFoundError(f"{path} is not a model checkpoint: no {MODEL_CONFIG_FILE}")
  try:
    fields = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
  return config_from_dict(fields, os.fspath(cfg_file))


def load_model(path: str) -> Tuple[dict, CLIPConfig]:
  """Reads a directory written by `save_model`: (numpy float32 params, cfg)."""
  path = fileio.absolute(path)
  cfg = load_model_config(path)
  params_dir = os.path.join(path, PARAMS_SUBDIR)
  if not fileio.isdir(params_dir):
    raise FileNotFoundError(f"{path} is not a model checkpoint: no {PARAMS_SUBDIR}/")
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(params_dir)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  check_params(params, cfg, path)
  return params, cfg


# ----------------------------------------------------------------------------
# Training checkpoints: the whole train state (params, optimizer state, step,
# PRNG key) plus the data iterator's state, through one orbax
# CheckpointManager in WORKDIR/checkpoints. Saves are asynchronous; the
# manager keeps the last `keep` steps.

TRAIN_CHECKPOINT_SUBDIR = "checkpoints"


def make_train_manager(workdir: str, keep: int = 3, save_interval_steps: int = 1,
                       best_metric: str = "") -> ocp.CheckpointManager:
  """Keeps the last `keep` steps, or with `best_metric` (an eval metric name
  such as "eval/urban1k-.../t2i_R@1", higher is better) the best `keep` ones."""
  best = {}
  if best_metric:
    best = dict(best_fn=lambda metrics: metrics[best_metric], best_mode="max",
                keep_checkpoints_without_metrics=True)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=save_interval_steps, create=True,
      enable_async_checkpointing=True, **best)
  return ocp.CheckpointManager(
      os.path.join(fileio.absolute(workdir), TRAIN_CHECKPOINT_SUBDIR),
      options=options, item_names=("state", "data"))


def save_train_state(manager: ocp.CheckpointManager, step: int, state,
                     data_iterator=None, force: bool = False,
                     metrics=None) -> bool:
  """Starts an async save of the train state (+ data iterator) at `step`;
  `metrics` feed the manager's best-checkpoint choice."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force,
                      metrics=metrics)


def restore_train_state(manager: ocp.CheckpointManager, abstract_state,
                        data_iterator=None, step=None):
  """Restores the latest (or given) step into arrays shaped/sharded like
  `abstract_state`; the data iterator is restored in place."""
  step = manager.latest_step() if step is None else step
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"]


# ----------------------------------------------------------------------------
# A training WORKDIR as a model source: WORKDIR/model_config.json (written at
# the start of training) + the latest train state's params. convert.py reads
# it like any other checkpoint, so a pod run exports with one command.

def write_workdir_model_config(workdir: str, cfg: CLIPConfig) -> None:
  """WORKDIR/model_config.json (process 0); local paths or gs:// URLs."""
  if jax.process_index() != 0:
    return
  fileio.atomic_write(fileio.path(workdir) / MODEL_CONFIG_FILE,
                      json.dumps(config_to_dict(cfg), indent=2))


def is_train_workdir(path: str) -> bool:
  root = fileio.path(path)
  return (fileio.isfile(root / MODEL_CONFIG_FILE) and
          fileio.isdir(root / TRAIN_CHECKPOINT_SUBDIR))


def load_train_params(workdir: str, step=None) -> Tuple[dict, CLIPConfig]:
  """Params (host numpy) of a training WORKDIR's latest (or given) step."""
  cfg = load_model_config(workdir)
  manager = ocp.CheckpointManager(
      os.path.join(fileio.absolute(workdir), TRAIN_CHECKPOINT_SUBDIR),
      item_names=("state",), item_handlers={"state": ocp.StandardCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}: no training checkpoint in "
                            f"{TRAIN_CHECKPOINT_SUBDIR}/")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      manager.item_metadata(step)["state"])
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))["state"]
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), state["params"])
  check_params(params, cfg, f"{workdir} step {step}")
  logging.info("Loaded params of %s at step %d", workdir, step)
  return params, cfg
