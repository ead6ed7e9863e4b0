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
import re
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
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
# CheckpointManager in WORKDIR/checkpoints. Saves are asynchronous.
#
# Failures never cost a good checkpoint:
#  - old steps are deleted by us, not orbax, and only once a newer save is
#    known to have been committed (orbax's own clean-up runs even after a
#    save that failed in the background);
#  - a failed save raises CheckpointSaveError as soon as it is known: the
#    loop polls (`check_saves`) after every step;
#  - free space is checked before each save;
#  - a step that does not restore (an empty folder, a truncated array file) is
#    reported, moved to WORKDIR/unrestorable_checkpoints/ (never deleted) and
#    the newest older step that restores is used.

TRAIN_CHECKPOINT_SUBDIR = "checkpoints"
UNRESTORABLE_SUBDIR = "unrestorable_checkpoints"
# A checkpoint needs its arrays' bytes plus metadata: ask for this much more.
FREE_SPACE_FACTOR = 1.1
FREE_SPACE_MARGIN = 16 << 20


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (full disk, unwritable folder)."""


class RestoreError(ValueError):
  """No checkpoint of the workdir could be restored."""


class TrainCheckpointManager(ocp.CheckpointManager):
  """orbax's manager with our retention (see above): keeps the newest `keep`
  steps, or with `best_metric` the best `keep` ones plus the newest."""

  def __init__(self, directory: str, keep: int, best_metric: str = ""):
    best = {}
    if best_metric:
      best = dict(best_fn=lambda metrics: metrics[best_metric], best_mode="max",
                  keep_checkpoints_without_metrics=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, save_interval_steps=1, create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=True, **best)
    super().__init__(directory, options=options, item_names=("state", "data"))
    self.keep = keep
    self.best_metric = best_metric
    self.unconfirmed_step: Optional[int] = None  # saved, old steps not yet deleted
    self.verified_step: Optional[int] = None  # known committed

  def _metric(self, step: int) -> Optional[float]:
    metrics = self.metrics(step) or {}
    value = metrics.get(self.best_metric)
    return None if value is None else float(value)

  def steps_to_delete(self, steps: Sequence[int]) -> List[int]:
    steps = sorted(steps)
    kept = set(steps[-1:])  # the newest: where a resume starts
    if self.best_metric:
      scored = {s: self._metric(s) for s in steps}
      with_metric = [s for s in steps if scored[s] is not None]
      kept |= set(sorted(with_metric, key=scored.get, reverse=True)[:self.keep])
      kept |= {s for s in steps if scored[s] is None}
    else:
      kept |= set(steps[-self.keep:])
    return [s for s in steps if s not in kept]

  def delete_old_steps(self) -> None:
    for step in self.steps_to_delete(_steps_on_disk(self)):
      logging.info("Deleting checkpoint step %d (keep_checkpoints=%d)", step,
                   self.keep)
      self.delete(step)


def _steps_on_disk(manager: ocp.CheckpointManager) -> List[int]:
  """The committed steps, read from the directory (not orbax's cache)."""
  manager.reload()
  return list(manager.all_steps())


def make_train_manager(workdir: str, keep: int = 3,
                       best_metric: str = "") -> TrainCheckpointManager:
  """Keeps the last `keep` steps, or with `best_metric` (an eval metric name
  such as "eval/urban1k-.../t2i_R@1", higher is better) the best `keep` ones
  (and the newest). Every step given to save_train_state is saved."""
  return TrainCheckpointManager(
      os.path.join(fileio.absolute(workdir), TRAIN_CHECKPOINT_SUBDIR), keep,
      best_metric)


def _newest_good_step(manager: ocp.CheckpointManager) -> str:
  steps = _steps_on_disk(manager)
  return (f"the newest good checkpoint, step {max(steps)}, is kept in "
          f"{manager.directory}" if steps else "there is no earlier checkpoint")


def _save_failed(manager, step: int, error: BaseException) -> CheckpointSaveError:
  return CheckpointSaveError(
      f"Saving the checkpoint of step {step} in {manager.directory} failed: "
      f"{type(error).__name__}: {error}; {_newest_good_step(manager)}. Free "
      "space or fix the folder, then rerun the same command to resume.")


def check_saves(manager: ocp.CheckpointManager, wait: bool = False) -> None:
  """Raises CheckpointSaveError if the last save failed.

  With `wait` (before the next save, at the end of a run) it waits for the
  save, then deletes the steps beyond the manager's `keep`: only then, and
  on every process at the same point (orbax's delete is a barrier). Without
  `wait` (after every step) it only looks, and only once the save is done,
  so a failure is reported at once rather than at the next save; on several
  processes it leaves the look to the next synchronous point (processes
  stopping at different steps would strand the others in a collective).
  """
  step = getattr(manager, "unconfirmed_step", None)
  if step is None:
    return
  if not wait:
    if (jax.process_count() > 1 or manager.verified_step == step or
        manager.is_saving_in_progress()):
      return
  try:
    manager.wait_until_finished()  # raises what the background commit raised
    manager.check_for_errors()
    if step not in _steps_on_disk(manager):
      raise RuntimeError("the step was not committed")
  except Exception as e:  # pylint: disable=broad-except  # any failure of the save
    manager.unconfirmed_step = None
    raise _save_failed(manager, step, e) from e
  manager.verified_step = step
  if wait:
    manager.unconfirmed_step = None
    manager.delete_old_steps()


def state_nbytes(state) -> int:
  """Bytes of a pytree's arrays (global shapes)."""
  return sum(int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(state))


def free_bytes(directory: str) -> Optional[int]:
  """Free bytes where `directory` is (None for URLs: no such notion)."""
  if fileio.is_url(directory):
    return None
  existing = os.path.abspath(directory)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  return shutil.disk_usage(existing).free


def check_free_space(manager: ocp.CheckpointManager, step: int, state) -> None:
  """CheckpointSaveError before a save that would not fit on the disk."""
  free = free_bytes(os.fspath(manager.directory))
  needed = int(state_nbytes(state) * FREE_SPACE_FACTOR) + FREE_SPACE_MARGIN
  if free is not None and free < needed:
    raise CheckpointSaveError(
        f"Not enough free space for the checkpoint of step {step}: it needs "
        f"about {needed / 2**30:.2f} GiB, {manager.directory} has "
        f"{free / 2**30:.2f} GiB free; {_newest_good_step(manager)}. Free "
        "space, then rerun the same command to resume.")


def save_train_state(manager: ocp.CheckpointManager, step: int, state,
                     data_iterator=None, force: bool = False,
                     metrics=None, wait: bool = False) -> bool:
  """Saves the train state (+ data iterator) at `step`: asynchronously, or
  with `wait` (preemption, the last step) synchronously. The previous save
  is confirmed first; `metrics` feed the best-checkpoint choice. Raises
  CheckpointSaveError (nothing is deleted then)."""
  check_saves(manager, wait=True)
  check_free_space(manager, step, state)
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  try:
    saved = manager.save(step, args=ocp.args.Composite(**items), force=force,
                         metrics=metrics)
  except Exception as e:  # pylint: disable=broad-except  # any failure of the save
    raise _save_failed(manager, step, e) from e
  if saved:
    manager.unconfirmed_step = step
  if wait:
    check_saves(manager, wait=True)
  return saved


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


# tensorstore's status codes: the line that names the file that failed.
_STORAGE_ERROR = re.compile(r"\b(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|"
                            r"FAILED_PRECONDITION|INVALID_ARGUMENT|INTERNAL|"
                            r"UNKNOWN|PERMISSION_DENIED):[^\n]*")


def _restore_problem(manager: ocp.CheckpointManager, step: int,
                     error: BaseException) -> str:
  """One line: which step, which file, what went wrong."""
  step_dir = os.path.join(os.fspath(manager.directory), str(step))
  if fileio.isdir(step_dir) and not list(fileio.path(step_dir).iterdir()):
    return f"step {step}: {step_dir}/ is empty"
  chain, seen = [], error
  while seen is not None and len(chain) < 20:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  for e in chain:  # tensorstore names the file it could not read
    match = _STORAGE_ERROR.search(str(e))
    if match:
      return f"step {step}: {match.group(0)[:400]}"
  broken = _broken_json_file(step_dir)
  if broken:
    return f"step {step}: {broken}"
  first = (str(error).strip().splitlines() or [""])[0][:400]
  return (f"step {step}: {type(error).__name__}: {first} (while restoring "
          f"{step_dir})")


# orbax's and grain's metadata files, all JSON.
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding")


def _files_under(directory, depth: int = 3) -> List[Any]:
  """Files up to `depth` folders down, sorted (no '**': object stores)."""
  files = []
  for path in sorted(directory.iterdir()):
    if fileio.isdir(path):
      if depth > 1:
        files += _files_under(path, depth - 1)
    else:
      files.append(path)
  return files


def _broken_json_file(step_dir: str) -> Optional[str]:
  """'FILE: not valid JSON (...)' for the first metadata file of a step that
  does not parse (a truncated write), else None."""
  if not fileio.isdir(step_dir):
    return None
  for path in _files_under(fileio.path(step_dir)):
    is_json = (path.name in _JSON_FILES or path.suffix == ".json" or
               path.parent.name == "array_metadatas")
    if not is_json:
      continue
    try:
      json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      return f"{path}: not valid JSON ({e}; truncated?)"
  return None


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves an unrestorable step out of the manager's way, keeping it."""
  workdir = os.path.dirname(os.fspath(manager.directory).rstrip("/"))
  target = os.path.join(workdir, UNRESTORABLE_SUBDIR, str(step))
  suffix = 1
  while fileio.exists(target):
    suffix += 1
    target = os.path.join(workdir, UNRESTORABLE_SUBDIR, f"{step}-{suffix}")
  if jax.process_index() == 0:
    fileio.makedirs(os.path.dirname(target))
    fileio.path(os.path.join(os.fspath(manager.directory), str(step))).rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"fixclip_move_aside_{step}")
  return target


def restore_newest(manager: ocp.CheckpointManager, abstract_state,
                   data_iterator=None, newest: Optional[int] = None,
                   fallback: bool = True):
  """(state, step) of the newest step (<= `newest`) that restores.

  With `fallback`, a step that fails to restore is reported (a warning naming
  the step and the file) and the next older one is tried; once one restores,
  the failed ones are moved to WORKDIR/unrestorable_checkpoints/ (never
  deleted; orbax would otherwise count them as the latest). If none
  restores, RestoreError lists them all and nothing is moved (a model that
  does not fit any of them is a config problem, not a broken checkpoint).
  """
  steps = sorted((s for s in _steps_on_disk(manager)
                  if newest is None or s <= newest), reverse=True)
  if not fallback:
    steps = steps[:1]
  problems, failed = [], []
  for step in steps:
    try:
      state = restore_train_state(manager, abstract_state, data_iterator, step)
    except Exception as e:  # pylint: disable=broad-except  # reported, next step tried
      problems.append(_restore_problem(manager, step, e))
      failed.append(step)
      logging.warning("Checkpoint %s: cannot restore it (%s)",
                      manager.directory, problems[-1])
      continue
    for bad in failed:
      target = _move_aside(manager, bad)
      logging.warning("Checkpoint step %d could not be restored; moved to %s "
                      "(kept for inspection); resuming from step %d", bad,
                      target, step)
    if failed:
      manager.reload()
    return state, step
  raise RestoreError(f"No checkpoint in {manager.directory} can be restored: "
                     + "; ".join(problems or ["there is none"]))


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


# What the checkpoints of a workdir were made with, recorded once (by the run
# that starts the workdir, beside model_config.json and config.json): a resume
# is checked against it before anything is written.
RUN_FILE = "run.json"


class WorkdirMismatchError(ValueError):
  """A resume whose model or process count does not fit the workdir."""


def write_run_record(workdir: str) -> None:
  """WORKDIR/run.json: the process and device count of its checkpoints."""
  if jax.process_index() != 0:
    return
  fileio.atomic_write(fileio.path(workdir) / RUN_FILE, json.dumps(
      {"process_count": jax.process_count(),
       "device_count": jax.device_count()}, indent=2))


def saved_steps(workdir: str) -> List[int]:
  """The steps in WORKDIR/checkpoints (read without creating anything)."""
  directory = fileio.path(workdir) / TRAIN_CHECKPOINT_SUBDIR
  if not fileio.isdir(directory):
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def has_train_checkpoint(workdir: str) -> bool:
  """True if WORKDIR/checkpoints holds a step (what a run resumes from)."""
  return bool(saved_steps(workdir))


def _read_json(path) -> Optional[Dict[str, Any]]:
  if not fileio.isfile(path):
    return None
  try:
    return json.loads(fileio.read_text(path))
  except json.JSONDecodeError as e:
    raise WorkdirMismatchError(f"{path}: not valid JSON ({e})") from e


def _checkpoint_process_count(workdir: str) -> Optional[int]:
  """Processes that wrote the workdir's checkpoints: run.json, else the data
  iterator files (process_I-of-N.json) of its newest step."""
  record = _read_json(fileio.path(workdir) / RUN_FILE)
  if record and "process_count" in record:
    return int(record["process_count"])
  directory = fileio.path(workdir) / TRAIN_CHECKPOINT_SUBDIR
  for step in reversed(saved_steps(workdir)):
    data = directory / str(step) / "data"
    if fileio.isdir(data):
      for f in data.iterdir():
        match = re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name)
        if match:
          return int(match.group(1))
  return None


def check_resume(workdir: str, cfg: CLIPConfig, with_data: bool = True) -> bool:
  """Whether WORKDIR holds checkpoints to resume from; WorkdirMismatchError
  (writing nothing) when they were made with another model config (naming
  every differing field) or, `with_data` (the data iterator is restored too),
  another process count."""
  if not has_train_checkpoint(workdir):
    return False
  recorded = _read_json(fileio.path(workdir) / MODEL_CONFIG_FILE)
  if recorded is not None:
    ours = config_to_dict(cfg)
    differ = [f"{k}: {recorded.get(k)!r} in the workdir, {ours.get(k)!r} in "
              "this config" for k in sorted(set(recorded) | set(ours))
              if _json_value(recorded.get(k)) != _json_value(ours.get(k))]
    if differ:
      raise WorkdirMismatchError(
          f"{workdir} holds checkpoints of another model "
          f"({os.path.join(workdir, MODEL_CONFIG_FILE)}): {'; '.join(differ)}."
          f" Use a new --workdir (--config.init_from={workdir} starts from "
          "its weights), or the config it was trained with.")
  processes = _checkpoint_process_count(workdir) if with_data else None
  if processes is not None and processes != jax.process_count():
    raise WorkdirMismatchError(
        f"{workdir}'s checkpoints were written by {processes} process(es); "
        f"this run has {jax.process_count()}. The data pipeline's position is "
        "saved per process and cannot be split differently: resume with "
        f"{processes} process(es), or start a new --workdir with "
        f"--config.init_from={workdir} (its weights, a fresh data order).")
  return True


def _json_value(value):
  """Tuples and lists compare equal (JSON has no tuples)."""
  return list(value) if isinstance(value, (list, tuple)) else value


def is_train_workdir(path: str) -> bool:
  root = fileio.path(path)
  return (fileio.isfile(root / MODEL_CONFIG_FILE) and
          fileio.isdir(root / TRAIN_CHECKPOINT_SUBDIR))


def load_train_params(workdir: str, step=None) -> Tuple[dict, CLIPConfig]:
  """Params (host numpy) of a training WORKDIR's latest (or given) step."""
  cfg = load_model_config(workdir)
  manager = ocp.CheckpointManager(
      os.path.join(fileio.absolute(workdir), TRAIN_CHECKPOINT_SUBDIR),
      item_names=("state", "data"),
      # The data item is named with its handler only so that orbax does not
      # warn that it cannot restore it; it is not read.
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})
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
