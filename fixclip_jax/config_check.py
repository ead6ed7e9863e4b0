"""Checks a run's config before anything is written or compiled.

`check_config(config, mode)` raises ConfigError (a ValueError), or
FileNotFoundError for a path, for the first problem it finds, naming the
dotted key, the value and what is accepted (the CLIs print either as one line
`PROGRAM: error: ...` and exit with status 2, cli.py):
  keys      a key base_config() does not have (a typo in a config file; the
            command line's --config.KEY overrides are checked by main.py)
  types     a value whose type differs from the default's (an int where a
            float is expected is fine; None only where a knob allows it)
  finite    every float knob (and float in a tuple) is a finite number: a NaN
            passes every comparison below and would reach the optimizer
  ranges    sizes and intervals that must be positive (log_every=0 would
            divide by zero after the first step), shares within [0, 1), ...
  model     heads that divide their tower's width
  names     dtype, objective (losses.get_objective), model size, data type,
            transform, short-caption policy, masking mode, remat policy,
            eval datasets, ...
  devices   a mesh that does not cover the devices; a global batch that the
            hosts or devices do not divide
  paths     the data (manifest, shards), image root, tokenizer file,
            init_from and eval root that the mode reads
Checks of the workdir (a resume with another model) and of init_from's
weights need the files themselves: train.py runs them, also before writing.
"""
import dataclasses
import difflib
import math
from typing import Any, Iterator, Tuple

import jax
import ml_collections

from fixclip_jax import config_base
from fixclip_jax import fileio
from fixclip_jax import losses
from fixclip_jax import metrics
from fixclip_jax import step as step_lib
from fixclip_jax.data import pipeline
from fixclip_jax.data import sources
from fixclip_jax.data import transforms
from fixclip_jax.evaluation import datasets as eval_datasets
from fixclip_jax.models import clip
from fixclip_jax.models import fixclip
from fixclip_jax.models import layers
from fixclip_jax.models import sizes


class ConfigError(ValueError):
  """A config value that cannot work, worded for the user (one line)."""


# Knobs whose None means something (config_base's comments say what).
NULLABLE = ("loss.max_logit_scale", "model.positional_keep")
POSITIVE = (
    "num_train_steps", "log_every", "checkpoint_every", "keep_checkpoints",
    "data.global_batch", "data.image_size", "data.text_context",
    "data.max_caption_chars", "data.max_consecutive_skips",
    "data.worker_buffer_size", "data.synthetic_num",
    "data.synthetic_image_size", "optim.accum_steps",
    "optim.grad_cache_chunks", "optim.lr",
    "optim.eps", "eval.batch_size", "eval.synthetic_num", "model.vocab_size",
    "model.context_length", "model.gta_sigma", "loss.pcm_components",
    "loss.pcm_group_size", "pretrain77.lr")
NON_NEGATIVE = (
    "eval_every", "resume_step", "peak_tflops", "data.num_epochs",
    "num_train_epochs", "data.holdout_first",
    "data.num_workers", "data.read_threads", "data.prefetch_buffer",
    "data.short_context", "data.read_timeout_s", "data.max_image_pixels",
    "optim.warmup_steps", "optim.grad_clip", "optim.weight_decay",
    "optim.new_params_lr", "optim.max_skipped_updates", "model.num_prompts",
    "model.gta_groups", "loss.short_weight",
    "pretrain77.steps")
UNIT_INTERVAL = ("masking.ratio", "loss.label_smoothing", "optim.b1",
                 "optim.b2")  # [0, 1)
# main.py branches on these two (--mode; config.distributed). They live here,
# below main.py, so that the check and the flag read the same tuple.
MODES = ("train_and_eval", "train", "eval")
DISTRIBUTED = ("auto", "on", "off")  # when to call jax.distributed.initialize
CHOICES = {
    "dtype": tuple(step_lib.DTYPES),
    "model_name": tuple(sizes.SIZES),
    "remat": ("none",) + tuple(clip.REMAT_POLICIES),
    "attn_implementation": ("",) + layers.ATTN_IMPLEMENTATIONS,
    "distributed": DISTRIBUTED,
    "masking.mode": fixclip.MASKING_MODES,
    "model.region_layout": fixclip.REGION_LAYOUTS,
    "model.prompt_mode": fixclip.PROMPT_MODES,
    "data.type": sources.SOURCE_TYPES,
    "data.transform": transforms.TRAIN_TRANSFORMS,
    "data.short_caption": pipeline.SHORT_CAPTION_POLICIES,
    "wandb.mode": metrics.WANDB_MODES,
}


def _leaves(node: ml_collections.ConfigDict, prefix: str = ""
            ) -> Iterator[Tuple[str, Any]]:
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _fail(key: str, value: Any, accepted: str) -> ConfigError:
  return ConfigError(f"config.{key}={value!r}: {accepted}")


# ----------------------------------------------------------------------------
# Keys and types, against base_config().

def _type_name(value: Any) -> str:
  return "None" if value is None else type(value).__name__


def _kind(default: Any) -> str:
  """What a knob with this default accepts, in words."""
  for types, words in ((bool, "true or false"), (int, "an integer"),
                       (float, "a number"), (str, "a string"),
                       ((tuple, list), "a tuple or list")):
    if isinstance(default, types):
      return words
  return f"a {_type_name(default)}"


def _type_ok(value: Any, default: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def check_keys_and_types(config: ml_collections.ConfigDict) -> None:
  base = config_base.base_config()
  defaults = dict(_leaves(base))
  sections = {k.rsplit(".", 1)[0] for k in defaults if "." in k}
  # config.model takes any CLIPConfig field (sizes.model_config): base_config
  # lists the ones FIX-CLIP sets; widths, layers, image size... override the size.
  size_fields = {f"model.{f.name}": f.default
                 for f in dataclasses.fields(sizes.CLIPConfig)}
  for key, value in _leaves(config):
    if key not in defaults and key in size_fields:
      default = size_fields[key]
      if value is not None and default is not None and not _type_ok(value, default):
        raise _fail(key, value, f"must be {_kind(default)}, not a "
                    f"{_type_name(value)}")
      continue
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f" (did you mean {close[0]}?)" if close else ""
      if key in sections:
        hint = f" ({key} is a section of knobs, not a value)"
      raise ConfigError(f"config.{key}: no such config key{hint}")
    default = defaults[key]
    if default is None:  # a placeholder: ml_collections checks its type
      continue
    if value is None:
      if key not in NULLABLE:
        raise _fail(key, value, f"must be {_kind(default)} (None is only "
                    f"accepted for {', '.join(NULLABLE)})")
      continue
    if not _type_ok(value, default):
      raise _fail(key, value, f"must be {_kind(default)}, not a "
                  f"{_type_name(value)}")


# ----------------------------------------------------------------------------
# Values.

def _floats(value: Any) -> Iterator[float]:
  """The floats of a knob's value, also inside tuples and lists."""
  if isinstance(value, float):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _floats(item)


def check_finite(config: ml_collections.ConfigDict) -> None:
  """Every float knob, found generically (no list to forget one), is finite:
  NaN compares False with every bound, so the range checks cannot see it."""
  for key, value in _leaves(config):
    if any(not math.isfinite(x) for x in _floats(value)):
      raise _fail(key, value, "must be a finite number (not NaN or infinity)")


def check_ranges(config: ml_collections.ConfigDict) -> None:
  check_finite(config)
  for key in POSITIVE:
    value = _get(config, key)
    if value is not None and value <= 0:
      raise _fail(key, value, "must be > 0")
  for key in NON_NEGATIVE:
    value = _get(config, key)
    if value is not None and value < 0:
      raise _fail(key, value, "must be >= 0")
  for key in UNIT_INTERVAL:
    value = _get(config, key)
    if not 0 <= value < 1:
      raise _fail(key, value, "must be in [0, 1)")
  share = config.data.synthetic_late_detail_share
  if not 0 <= share <= 1:
    raise _fail("data.synthetic_late_detail_share", share, "must be in [0, 1]")
  scale, ratio = config.data.rrc_scale, config.data.rrc_ratio
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    raise _fail("data.rrc_scale", scale, "must be (low, high) with 0 < low "
                "<= high <= 1")
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    raise _fail("data.rrc_ratio", ratio, "must be (low, high) with 0 < low "
                "<= high")
  for axis in ("data", "fsdp"):
    value = config.mesh[axis]
    if value != -1 and value < 1:
      raise _fail(f"mesh.{axis}", value, "must be >= 1, or -1 (what the other "
                  "axis leaves)")
  if config.pretrain77.steps and config.init_from:
    raise ConfigError(f"config.pretrain77.steps={config.pretrain77.steps} "
                      "trains the model this run starts from, and "
                      f"config.init_from={config.init_from!r} names one: set "
                      "one of them (--config.pretrain77.steps=0 to start "
                      "from init_from)")
  if config.mesh.data == -1 and config.mesh.fsdp == -1:
    raise ConfigError("config.mesh.data and config.mesh.fsdp are both -1: at "
                      "most one may be")


def check_names(config: ml_collections.ConfigDict) -> None:
  for key, accepted in CHOICES.items():
    value = _get(config, key)
    if value not in accepted:
      raise _fail(key, value, f"use one of {' | '.join(map(str, accepted))}")
  try:
    losses.get_objective(config.objective)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  known = ({eval_datasets.canonical_name(n) for n in
            list(eval_datasets.RETRIEVAL_LOADERS) +
            list(eval_datasets.CLASSIFICATION_LOADERS)} | {"synthetic"})
  for name in [n.strip() for n in config.eval.datasets.split(",") if n.strip()]:
    if eval_datasets.canonical_name(name) not in known:
      raise _fail("eval.datasets", config.eval.datasets,
                  f"{name!r} is not a benchmark; known: synthetic, "
                  f"{', '.join(sorted(eval_datasets.RETRIEVAL_LOADERS))}, "
                  f"{', '.join(sorted(eval_datasets.CLASSIFICATION_LOADERS))}")


def check_model(config: ml_collections.ConfigDict) -> sizes.CLIPConfig:
  try:
    cfg = sizes.model_config(config)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model / config.model_name: {e}") from None
  for tower in ("vision", "text"):
    width, heads = getattr(cfg, f"{tower}_width"), getattr(cfg, f"{tower}_heads")
    if heads < 1 or width % heads:
      raise _fail(f"model.{tower}_heads", heads, f"must divide the "
                  f"{tower} width ({width}, model {config.model_name} with "
                  "config.model overrides)")
  if config.data.image_size != cfg.image_size:
    raise _fail("data.image_size", config.data.image_size,
                f"model {config.model_name} takes {cfg.image_size}px images")
  for key in ("data.text_context", "data.short_context"):
    if _get(config, key) > cfg.context_length:
      raise _fail(key, _get(config, key), f"must be <= the model's "
                  f"context_length ({cfg.context_length})")
  return cfg


def check_devices(config: ml_collections.ConfigDict, device_count: int,
                  process_count: int, evaluate: bool = True) -> None:
  data, fsdp = config.mesh.data, config.mesh.fsdp
  if data == -1:
    if device_count % fsdp:
      raise _fail("mesh.fsdp", fsdp, f"must divide the {device_count} devices")
    data = device_count // fsdp
  if fsdp == -1:
    if device_count % data:
      raise _fail("mesh.data", data, f"must divide the {device_count} devices")
    fsdp = device_count // data
  if data * fsdp != device_count:
    raise ConfigError(f"config.mesh.data={config.mesh.data} x config.mesh.fsdp"
                      f"={config.mesh.fsdp} must cover the {device_count} "
                      "devices")
  if config.pretrain77.steps and process_count > 1:
    raise _fail("pretrain77.steps", config.pretrain77.steps, "is for "
                "single-process runs (the demo); on several hosts train the "
                "77-token start once and pass it as init_from")
  batch = config.data.global_batch
  if batch % process_count:
    raise _fail("data.global_batch", batch, f"must be divisible by the number "
                f"of processes ({process_count})")
  if batch % (data * fsdp):
    raise _fail("data.global_batch", batch, f"must be divisible by the number "
                f"of devices it is split over ({data * fsdp}: mesh data={data}"
                f" x fsdp={fsdp})")
  chunks = config.optim.grad_cache_chunks
  if batch % (data * fsdp * chunks):
    # Strided chunks (step.split_chunks) stay spread over every device.
    raise _fail("optim.grad_cache_chunks", chunks, f"times the {data * fsdp} "
                f"devices must divide data.global_batch={batch}")
  if evaluate and config.eval.batch_size % (data * fsdp):
    raise _fail("eval.batch_size", config.eval.batch_size, f"must be divisible "
                f"by the number of devices it is split over ({data * fsdp})")


# ----------------------------------------------------------------------------
# Paths.

def _expect(key: str, path: str, what: str, kind: str = "any") -> None:
  """FileNotFoundError (one line too) naming the key when `path` is missing."""
  if not path:
    raise _fail(key, path, f"needs {what}")
  exists = {"any": fileio.exists, "file": fileio.isfile,
            "dir": fileio.isdir}[kind](path)
  if not exists:
    raise FileNotFoundError(
        f"config.{key}={path!r}: no such "
        f"{'file or folder' if kind == 'any' else kind} ({what})")


def check_paths(config: ml_collections.ConfigDict, mode: str) -> None:
  d = config.data
  if mode != "eval":
    if d.type == "jsonl":
      _expect("data.path", d.path, "a JSONL manifest", "file")
    elif d.type == "sharegpt4v":
      _expect("data.path", d.path, "ShareGPT4V's captioner json", "file")
    elif d.type in ("tar", "array_record"):
      suffix = ".tar" if d.type == "tar" else ".array_record"
      try:
        sources.expand_paths(d.path, suffix)
      except FileNotFoundError as e:
        raise FileNotFoundError(f"config.data.path={d.path!r}: {e}") from None
    if d.type in ("jsonl", "sharegpt4v") and d.image_root:
      _expect("data.image_root", d.image_root, "the images' folder", "dir")
  if d.tokenizer != "clip":
    _expect("data.tokenizer", d.tokenizer, '"clip" or a SentencePiece .model '
            "file", "file")
  if config.init_from:
    _expect("init_from", config.init_from, "a checkpoint file or folder")
  if mode != "train" and config.eval.root:
    _expect("eval.root", config.eval.root, "the benchmarks' data folder")


def check_config(config: ml_collections.ConfigDict, mode: str = "train",
                 device_count: int = 0, process_count: int = 0) -> None:
  """Raises ConfigError for the first problem (see the module docstring).
  Devices default to this process's JAX view (no computation is started)."""
  if mode not in MODES:
    raise ConfigError(f"--mode={mode!r}: use one of {' | '.join(MODES)}")
  check_keys_and_types(config)
  check_ranges(config)
  check_names(config)
  check_model(config)
  check_devices(config, device_count or jax.device_count(),
                process_count or jax.process_count(), evaluate=mode != "train")
  check_paths(config, mode)

