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
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Tuple

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from fixclip_jax.models.sizes import CLIPConfig

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_SUBDIR = "params"


def config_to_dict(cfg: CLIPConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from_dict(fields: dict, source: str = "config") -> CLIPConfig:
  """CLIPConfig from its JSON fields; an unknown field is an error naming it."""
  known = {f.name for f in dataclasses.fields(CLIPConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"{source}: unknown CLIPConfig field(s) {unknown}; "
                     f"known: {sorted(known)}")
  # JSON has no tuples; CLIPConfig is frozen and hashable, so restore them.
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  return CLIPConfig(**fields)


def is_model_dir(path: str) -> bool:
  """True if `path` looks like a directory written by `save_model`."""
  return (os.path.isdir(path) and
          os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE)) and
          os.path.isdir(os.path.join(path, PARAMS_SUBDIR)))


@functools.lru_cache(maxsize=16)
def _param_shapes_cached(cfg: CLIPConfig) -> dict:
  from fixclip_jax.models import clip  # pylint: disable=g-import-not-at-top
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), np.float32)
  text = jax.ShapeDtypeStruct((1, cfg.context_length), np.int32)
  variables = jax.eval_shape(clip.CLIP(cfg).init, jax.random.PRNGKey(0), images, text)
  return unflatten_params({k: tuple(v.shape) for k, v in
                           flatten_params(variables["params"]).items()})


def param_shapes(cfg: CLIPConfig) -> dict:
  """{...: shape tuple} of `CLIP(cfg)`'s params, without allocating them."""
  return unflatten_params(flatten_params(_param_shapes_cached(cfg)))  # a fresh copy


def flatten_params(tree, prefix: str = "") -> dict:
  """Nested dict -> {"a/b/c": leaf}."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten_params(v, path + "/"))
    else:
      out[path] = v
  return out


def unflatten_params(flat: dict) -> dict:
  """{"a/b/c": leaf} -> nested dict."""
  tree = {}
  for path, leaf in flat.items():
    *parents, name = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return tree


def check_params(params: dict, cfg: CLIPConfig, source: str) -> None:
  """Raises one ValueError naming every missing/unexpected/mis-shaped param."""
  expected = flatten_params(param_shapes(cfg))
  found = {k: tuple(np.shape(v)) for k, v in flatten_params(params).items()}
  problems = [f"missing {k!r} (expected {s})" for k, s in expected.items()
              if k not in found]
  problems += [f"unexpected {k!r} (found {s})" for k, s in found.items()
               if k not in expected]
  problems += [f"{k!r}: expected shape {expected[k]}, found {found[k]}"
               for k in expected if k in found and found[k] != expected[k]]
  if problems:
    raise ValueError(f"{source}: params do not match the model config: "
                     + "; ".join(problems))


@contextlib.contextmanager
def atomic_directory(path: str):
  """Yields a temporary directory next to `path`, renamed to `path` when the
  block succeeds and deleted when it fails: never a half-written `path`."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    yield tmp
    if os.path.exists(path):
      shutil.rmtree(path)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def save_model(path: str, params: dict, cfg: CLIPConfig, *,
               overwrite: bool = False) -> None:
  """Writes params (float32, moved to host) and cfg to the directory `path`."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} already exists; not overwriting it")
  check_params(params, cfg, f"save_model({path})")
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  with atomic_directory(path) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_SUBDIR), host)
    with open(os.path.join(tmp, MODEL_CONFIG_FILE), "w") as f:
      json.dump(config_to_dict(cfg), f, indent=2)
  logging.info("Saved model checkpoint to %s", path)


def load_model_config(path: str) -> CLIPConfig:
  cfg_file = os.path.join(path, MODEL_CONFIG_FILE)
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"{path} is not a model checkpoint: no {MODEL_CONFIG_FILE}")
  try:
    with open(cfg_file) as f:
      fields = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
  return config_from_dict(fields, cfg_file)


def load_model(path: str) -> Tuple[dict, CLIPConfig]:
  """Reads a directory written by `save_model`: (numpy float32 params, cfg)."""
  path = os.path.abspath(path)
  cfg = load_model_config(path)
  params_dir = os.path.join(path, PARAMS_SUBDIR)
  if not os.path.isdir(params_dir):
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


def absolute(path: str) -> str:
  """An absolute local path; URLs (gs://bucket/run) are left as they are."""
  return path if "://" in path else os.path.abspath(path)


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
      os.path.join(absolute(workdir), TRAIN_CHECKPOINT_SUBDIR),
      options=options, item_names=("state", "data"))


def save_train_state(manager: ocp.CheckpointManager, step: int, state,
                     data_iterator=None, force: bool = False,
                     metrics=None) -> bool:
  """Starts an async save of the train state (+ data iterator) at `step`;
  `metrics` feed the manager's best-checkpoint choice."""
  import grain  # pylint: disable=g-import-not-at-top
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force,
                      metrics=metrics)


def restore_train_state(manager: ocp.CheckpointManager, abstract_state,
                        data_iterator=None, step=None):
  """Restores the latest (or given) step into arrays shaped/sharded like
  `abstract_state`; the data iterator is restored in place."""
  import grain  # pylint: disable=g-import-not-at-top
  step = manager.latest_step() if step is None else step
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"]


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a tree of jax.Arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ----------------------------------------------------------------------------
# init_from: start a run from a converted or PyTorch checkpoint.

def adapt_pretrained(pretrained: dict, src_cfg: CLIPConfig, fresh: dict,
                     cfg: CLIPConfig, *, logit_scale: float = 0.0,
                     source: str = "init_from") -> dict:
  """Fits pretrained CLIP / Long-CLIP / FIX-CLIP params to the model `cfg`.

  - Text positions: a 77-row table is stretched to cfg.context_length with
    Long-CLIP's knowledge-preserved stretching (method.md §2), and the
    two-table scheme is created or collapsed to match cfg.positional_keep.
  - Parameters the checkpoint lacks (prompts, mask token, GTA heads) keep
    their fresh initialisation and are listed in the log; pretrained ones
    load unchanged. A shape mismatch is an error naming the key and both
    shapes; pretrained keys the model lacks are dropped with a warning.
  - logit_scale != 0 resets the temperature (Long-CLIP: ln 100).
  """
  from fixclip_jax import positional  # pylint: disable=g-import-not-at-top
  text = dict(pretrained["text"])
  pe = np.asarray(text["positional_embedding"])
  pe_res = text.pop("positional_embedding_res", None)
  if pe_res is not None and cfg.positional_keep is None:
    pe = positional.combined_positional_embedding(pe, np.asarray(pe_res),
                                                  src_cfg.positional_keep)
    pe_res = None
  if pe.shape[0] != cfg.context_length:
    keep = cfg.positional_keep if cfg.positional_keep is not None else 20
    factor = (cfg.context_length - keep) // max(pe.shape[0] - keep, 1)
    if positional.stretched_length(pe.shape[0], keep, factor) != cfg.context_length:
      raise ValueError(f"{source}: cannot stretch a {pe.shape[0]}-row positional "
                       f"table to context_length {cfg.context_length}")
    logging.info("%s: stretching text positions %d -> %d (keep=%d, factor=%d)",
                 source, pe.shape[0], cfg.context_length, keep, factor)
    pe = positional.stretch_positional_embedding(pe, keep, factor)
    pe_res = None
  text["positional_embedding"] = pe
  if cfg.positional_keep is not None:
    text["positional_embedding_res"] = pe if pe_res is None else np.asarray(pe_res)
  pretrained = {**pretrained, "text": text}

  flat_pre = flatten_params(pretrained)
  flat_fresh = flatten_params(fresh)
  merged, new = {}, []
  for key, value in flat_fresh.items():
    if key in flat_pre:
      if tuple(np.shape(flat_pre[key])) != tuple(np.shape(value)):
        raise ValueError(f"{source}: parameter {key} has shape "
                         f"{tuple(np.shape(flat_pre[key]))} in the checkpoint, "
                         f"model expects {tuple(np.shape(value))}")
      merged[key] = np.asarray(flat_pre[key], np.float32)
    else:
      merged[key] = np.asarray(value)
      new.append(key)
  dropped = sorted(set(flat_pre) - set(flat_fresh))
  if new:
    logging.info("%s: %d new parameter(s), freshly initialised: %s",
                 source, len(new), ", ".join(sorted(new)))
  if dropped:
    logging.warning("%s: %d checkpoint parameter(s) unused by this model: %s",
                    source, len(dropped), ", ".join(dropped))
  if logit_scale:
    merged["logit_scale"] = np.asarray(logit_scale, np.float32)
  return unflatten_params(merged)


def load_pretrained(path: str, cfg: CLIPConfig, fresh: dict, *,
                    logit_scale: float = 0.0) -> dict:
  """init_from: any checkpoint convert.py reads, adapted to `cfg`."""
  from fixclip_jax import convert  # pylint: disable=g-import-not-at-top
  params, src_cfg, fmt = convert.load_any(path)
  logging.info("init_from %s (%s): %s", path, fmt, src_cfg)
  return adapt_pretrained(jax.device_get(params), src_cfg, jax.device_get(fresh),
                          cfg, logit_scale=logit_scale, source=path)


# ----------------------------------------------------------------------------
# A training WORKDIR as a model source: WORKDIR/model_config.json (written at
# the start of training) + the latest train state's params. convert.py reads
# it like any other checkpoint, so a pod run exports with one command.

def write_workdir_model_config(workdir: str, cfg: CLIPConfig) -> None:
  """WORKDIR/model_config.json (process 0); local paths or gs:// URLs."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  directory = epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / MODEL_CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=2))


def is_train_workdir(path: str) -> bool:
  return (os.path.isdir(path) and
          os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE)) and
          os.path.isdir(os.path.join(path, TRAIN_CHECKPOINT_SUBDIR)))


def load_train_params(workdir: str, step=None) -> Tuple[dict, CLIPConfig]:
  """Params (host numpy) of a training WORKDIR's latest (or given) step."""
  cfg = load_model_config(workdir)
  manager = ocp.CheckpointManager(
      os.path.join(absolute(workdir), TRAIN_CHECKPOINT_SUBDIR),
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
