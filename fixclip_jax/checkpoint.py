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
import datetime
import errno
import json
import os
import re
import shutil
import socket
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import grain
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from fixclip_jax import fileio
from fixclip_jax.models.params import check_params
from fixclip_jax.models.sizes import CLIPConfig
from fixclip_jax.models.sizes import config_from_dict
from fixclip_jax.models.sizes import config_to_dict

try:
  import fcntl  # POSIX: the workdir lock (WorkdirLock)
except ImportError:  # Windows: the lock file's pid/host record alone
  fcntl = None

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_SUBDIR = "params"


class NonFiniteError(ValueError):
  """Weights or a train state holding NaN/Inf (never loaded, never saved)."""


def _key_name(path) -> str:
  """'params/visual/conv1/kernel' for a tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _is_float(x) -> bool:
  return np.issubdtype(np.dtype(x.dtype), np.floating) or (
      np.dtype(x.dtype).kind == "V")  # bfloat16 on some numpy builds


@jax.jit
def _leaf_stats(leaves: list) -> Tuple[jax.Array, jax.Array]:
  """(non-finite count, non-zero count) of each float array: two [n] int32."""
  bad = jnp.stack([jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves])
  nonzero = jnp.stack([jnp.count_nonzero(x) for x in leaves])
  return bad, nonzero


def _local_value(x) -> np.ndarray:
  """A replicated jit output as numpy, also when it spans several hosts."""
  return np.asarray(x.addressable_shards[0].data)


def tree_stats(tree) -> Dict[str, Tuple[int, int, int, int]]:
  """{key: (non-finite count, non-zero count, size, itemsize)} of every
  array of `tree` (device or host arrays; one jitted pass on the device).
  Non-float arrays count as finite."""
  flat = [(_key_name(p), x) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]]
  floats = [(k, x) for k, x in flat if _is_float(x)]
  stats = {k: (0, int(np.prod(np.shape(x), dtype=np.int64)),
               int(np.prod(np.shape(x), dtype=np.int64)),
               np.dtype(x.dtype).itemsize) for k, x in flat}
  if floats:
    bad, nonzero = _leaf_stats([x for _, x in floats])
    bad, nonzero = _local_value(bad), _local_value(nonzero)
    for i, (k, x) in enumerate(floats):
      stats[k] = (int(bad[i]), int(nonzero[i]), stats[k][2], stats[k][3])
  return stats


def first_nonfinite(tree, stats=None) -> Optional[str]:
  """'KEY (N of M values are NaN/Inf)' for the first such array, else None."""
  for key, (bad, _, size, _) in (stats or tree_stats(tree)).items():
    if bad:
      return f"{key} ({bad} of {size} values are NaN/Inf)"
  return None


def check_finite(params, source: str) -> None:
  """NonFiniteError naming the first parameter holding NaN/Inf: weights that
  would make every feature NaN are refused at load, not discovered later."""
  host = jax.tree.map(np.asarray, params)
  for key, value in jax.tree_util.tree_flatten_with_path(host)[0]:
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
      count = int((~np.isfinite(value)).sum())
      raise NonFiniteError(f"{source}: parameter {_key_name(key)} holds "
                           f"{count} NaN/Inf value(s) of {value.size}; these "
                           "weights are broken (a diverged run?), not loaded")


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
  check_finite(host, f"save_model({path})")
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
  check_finite(params, path)
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
#  - free space is checked before each save, and that the folder takes a
#    write (a read-only folder would otherwise stall in orbax's barrier);
#  - a state holding NaN/Inf is never saved (NonFiniteError);
#  - a step that does not restore (an empty folder, a truncated array file) is
#    reported, moved to WORKDIR/unrestorable_checkpoints/ (never deleted) and
#    the newest older step that restores is used.

TRAIN_CHECKPOINT_SUBDIR = "checkpoints"
UNRESTORABLE_SUBDIR = "unrestorable_checkpoints"
# What a save writes (checkpoint_bytes_estimate): the arrays' non-zero bytes
# (orbax compresses; Adam's moments of the token table are mostly zero rows,
# so the raw size overstates it ~2.6x on the demo model), this much metadata
# per array, a margin, and FREE_SPACE_FACTOR for what compression keeps.
FREE_SPACE_FACTOR = 1.1
FREE_SPACE_PER_ARRAY = 4 << 10
FREE_SPACE_MARGIN = 1 << 20


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
  what = _write_error_words(error)
  cause = f"the folder {what}; " if what else ""
  return CheckpointSaveError(
      f"Saving the checkpoint of step {step} in {manager.directory} failed: "
      f"{cause}{type(error).__name__}: {error}; "
      f"{_newest_good_step(manager)}. Free space or make the folder "
      "writable, then rerun the same command to resume.")


# tensorstore reports a failed local write as text: "... Read-only file
# system [os_error_code=30]" inside a ValueError.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _write_error_words(error: Optional[BaseException]) -> Optional[str]:
  """What a failed save's error (or its causes) says of the folder: the
  _WRITE_ERRORS words of an OSError's errno or of tensorstore's code."""
  while error is not None:
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code is None:
      found = _OS_ERROR_CODE.search(str(error))
      code = int(found.group(1)) if found else None
    if code in _WRITE_ERRORS:
      return _WRITE_ERRORS[code]
    error = error.__cause__ or error.__context__
  return None


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


def checkpoint_bytes_estimate(state, stats=None) -> int:
  """About what saving `state` adds to the disk (tested within 1.5x)."""
  stats = stats or tree_stats(state)
  data = sum(nonzero * itemsize for _, nonzero, _, itemsize in stats.values())
  return (int(data * FREE_SPACE_FACTOR) + FREE_SPACE_PER_ARRAY * len(stats) +
          FREE_SPACE_MARGIN)


def free_bytes(directory: str) -> Optional[int]:
  """Free bytes where `directory` is (None for URLs: no such notion)."""
  if fileio.is_url(directory):
    return None
  existing = os.path.abspath(directory)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  return shutil.disk_usage(existing).free


# A write that fails at once says what the folder is: errno -> words.
_WRITE_ERRORS = {errno.EROFS: "is on a read-only file system",
                 errno.EACCES: "is not writable (permission denied)",
                 errno.EPERM: "is not writable (operation not permitted)",
                 errno.ENOSPC: "has no space left",
                 errno.EDQUOT: "is over its disk quota"}


def check_writable(manager: ocp.CheckpointManager, step: int) -> None:
  """CheckpointSaveError, at once, when the checkpoint folder takes no write.

  orbax creates a step's folder in a background thread and the save waits
  for it on a 300 s barrier, so a folder that turned read-only would stall
  that long and then report a timeout; a small file written and removed
  here names the cause instead (local folders; object stores have no such
  state)."""
  directory = os.fspath(manager.directory)
  if fileio.is_url(directory):
    return
  probe = os.path.join(directory, f".write_probe-{socket.gethostname()}-"
                       f"{os.getpid()}")
  try:
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      os.write(fd, b"fixclip")
    finally:
      os.close(fd)
    os.remove(probe)
  except OSError as e:
    what = _WRITE_ERRORS.get(e.errno, f"cannot be written ({e.strerror})")
    raise CheckpointSaveError(
        f"Cannot save the checkpoint of step {step}: {directory} {what} "
        f"({errno.errorcode.get(e.errno, e.errno)}); "
        f"{_newest_good_step(manager)}. Make the folder writable (or free "
        "space), then rerun the same command to resume.") from None


def check_free_space(manager: ocp.CheckpointManager, step: int, state,
                     stats=None) -> None:
  """CheckpointSaveError before a save that would not fit on the disk."""
  free = free_bytes(os.fspath(manager.directory))
  needed = checkpoint_bytes_estimate(state, stats)
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
  CheckpointSaveError (nothing is deleted then); NonFiniteError for a state
  holding NaN/Inf (nothing written: the newest good checkpoint stays the
  newest)."""
  check_saves(manager, wait=True)
  stats = tree_stats(state)
  bad = first_nonfinite(state, stats)
  if bad is not None:
    raise NonFiniteError(
        f"Not saving the checkpoint of step {step}: the train state holds "
        f"NaN/Inf in {bad}; {_newest_good_step(manager)}. The run diverged "
        "with config.skip_nonfinite off: lower --config.optim.lr and rerun "
        "(it resumes from that checkpoint).")
  check_writable(manager, step)
  check_free_space(manager, step, state, stats)
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


# ----------------------------------------------------------------------------
# One run per workdir: WORKDIR/run.lock, taken (process 0) before the first
# write and held until the run ends. Two trainers on one workdir would
# interleave metrics, overwrite config.json and delete each other's steps.

LOCK_FILE = "run.lock"


class WorkdirLockedError(OSError):
  """Another live run holds the workdir."""


def _proc_stat(pid: int) -> List[str]:
  """/proc/PID/stat's fields after the command name ([] where there is none)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()
  except (OSError, IndexError):
    return []


def _process_start(pid: int) -> Optional[str]:
  """The kernel's start time of `pid` (/proc; None elsewhere): a pid reused
  by another process has another start time."""
  fields = _proc_stat(pid)
  return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, start: Optional[str]) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  fields = _proc_stat(pid)
  if fields and fields[0] in ("Z", "X"):  # killed, not yet reaped
    return False
  now = _process_start(pid)
  return start is None or now is None or now == start


class WorkdirLock:
  """An exclusive lock on a local workdir: WORKDIR/run.lock holds the
  holder's pid, host and start time, under an OS lock (flock) that the
  kernel drops when the holder dies, however it dies.

  acquire() raises WorkdirLockedError naming the holder when a live run has
  it; a lock left by a dead process of this host (kill -9, a crash) is taken
  over with a warning. A holder on another host whose OS lock is gone (a
  file system without flock) cannot be checked: refused, naming the file to
  delete. On several processes only process 0 locks, the others learn its
  outcome. URL workdirs (gs://) are not locked (no exclusive create there).
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(fileio.absolute(workdir), LOCK_FILE)
    self._fd: Optional[int] = None

  def _holder(self, record: Dict[str, Any]) -> str:
    return (f"pid {record.get('pid')} on host {record.get('host')}, started "
            f"{record.get('started')}")

  def _take(self) -> None:
    fileio.makedirs(os.path.dirname(self.path))
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      if fcntl is not None:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          raise WorkdirLockedError(
              f"{self.workdir} is in use by another run "
              f"({self._holder(self._read(fd))}; {self.path}). Wait for it to "
              "end or stop it, or use another --workdir.") from None
      record = self._read(fd)
      if record.get("pid") and record.get("pid") != os.getpid():
        here = record.get("host") == socket.gethostname()
        if here and _pid_alive(int(record["pid"]), record.get("pid_start")):
          raise WorkdirLockedError(
              f"{self.workdir} is in use by another run ({self._holder(record)}"
              f"; {self.path}). Wait for it to end or stop it, or use another "
              "--workdir.")
        if not here and fcntl is None:
          raise WorkdirLockedError(
              f"{self.workdir} may be in use by a run on another host "
              f"({self._holder(record)}); if that run is gone, delete "
              f"{self.path} and rerun.")
        logging.warning("Taking over the lock of %s left by a run that ended "
                        "without releasing it (%s)", self.workdir,
                        self._holder(record))
      now = datetime.datetime.now(datetime.timezone.utc)
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps({
          "pid": os.getpid(), "host": socket.gethostname(),
          "started": now.isoformat(timespec="seconds"),
          "pid_start": _process_start(os.getpid())}).encode(), 0)
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd

  @staticmethod
  def _read(fd: int) -> Dict[str, Any]:
    try:
      record = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:  # torn by a crash mid-write: no holder to name
      return {}
    return record if isinstance(record, dict) else {}

  def acquire(self) -> None:
    """Takes the lock (again: nothing); raises WorkdirLockedError."""
    if self._fd is not None or fileio.is_url(self.workdir):
      return
    error = ""
    if jax.process_index() == 0:
      try:
        self._take()
      except WorkdirLockedError as e:
        error = str(e)
    if jax.process_count() > 1:
      failed = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
      if failed and not error:
        error = (f"{self.workdir} is in use by another run (process 0 could "
                 f"not take {self.path}; its log says by whom)")
    if error:
      raise WorkdirLockedError(error)

  def release(self) -> None:
    """Empties the record and drops the OS lock (the file stays: removing a
    locked file would let two later runs lock two different files)."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:  # a read-only or full folder: the OS lock still goes
      pass
    os.close(self._fd)
    self._fd = None


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
  check_finite(params, f"{workdir} step {step}")
  logging.info("Loaded params of %s at step %d", workdir, step)
  return params, cfg
