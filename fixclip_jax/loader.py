"""One model loader: params + CLIPConfig from any path we read.

  orbax          a model directory written by `checkpoint.save_model`
  train_workdir  a training --workdir (its latest train state's params)
  openai         OpenAI / open_clip state dict (.pt/.pth/.bin/.safetensors);
                 a nested "state_dict" and a "module." prefix are unwrapped
  longclip       the same with Long-CLIP's 248-row `positional_embedding` and
                 `positional_embedding_res` (docs/method.md §2)
  fixclip        the same with FIX-CLIP's `fixclip.*` extra keys
  hf             a Hugging Face `CLIPModel` directory (config.json + weights)

The format is detected and logged; `load_any` is what api.load,
pretrained (init_from), embed, eval and convert read with. Files go through
torch_files.py (no arbitrary unpickle), keys through layouts.py.
"""
import json
import os
from typing import Optional, Sequence, Tuple

from absl import logging

from fixclip_jax import checkpoint
from fixclip_jax import fileio
from fixclip_jax import layouts
from fixclip_jax import torch_files
from fixclip_jax.models.sizes import CLIPConfig

# The readers define these (torch_files.py); the same classes, named here too.
CheckpointError = torch_files.CheckpointError
StateDict = torch_files.StateDict


def _drop(sd: StateDict, keys: Sequence[str], source: str) -> StateDict:
  dropped = [k for k in keys if k in sd]
  if dropped:
    logging.info("%s: ignoring non-parameter entries %s", source, dropped)
  return {k: v for k, v in sd.items() if k not in dropped}


def _is_hf_keys(sd: StateDict) -> bool:
  return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


def _load_hf_dir(directory: str) -> Tuple[dict, CLIPConfig]:
  config_file = os.path.join(directory, "config.json")
  try:
    hf = json.loads(fileio.read_text(config_file))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_file}: not valid JSON ({e})") from e
  cfg = layouts.config_from_hf(hf, config_file)
  sd = _drop(torch_files.read_hf_weights(directory), layouts.HF_IGNORED, directory)
  return layouts.state_dict_to_params(sd, cfg, "hf", directory), cfg


def _load_openai(sd: StateDict, path: str, act: Optional[str]) -> Tuple[dict, CLIPConfig]:
  sd = _drop(sd, layouts.OPENAI_IGNORED, path)
  try:
    # Heads are not visible in shapes: width // 64, as OpenAI's build_model.
    cfg = layouts.config_from_shapes({k: v.shape for k, v in sd.items()},
                                     act=act or "quick_gelu")
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot infer the architecture: {e}") from e
  if act is None:
    logging.info("%s: the activation is not stored in OpenAI-layout files; "
                 "assuming quick_gelu (OpenAI's)", path)
  return layouts.state_dict_to_params(sd, cfg, "openai", path), cfg


def detect_format(path: str) -> str:
  """'orbax' | 'hf' | 'openai' | 'longclip' without converting anything."""
  if fileio.isdir(path):
    if checkpoint.is_model_dir(path):
      return "orbax"
    if fileio.isfile(os.path.join(path, "config.json")):
      return "hf"
    raise CheckpointError(f"{path}: directory is neither one of our model "
                          "checkpoints nor a HF CLIPModel (no config.json)")
  return _format_of(torch_files.read_state_dict(path), path)


def _format_of(sd: StateDict, path: str) -> str:
  if _is_hf_keys(sd):
    return "hf"
  if "visual.conv1.weight" in sd:
    if any(k.startswith(layouts.FIXCLIP_PREFIX) for k in sd):
      return "fixclip"
    return "longclip" if "positional_embedding_res" in sd else "openai"
  raise CheckpointError(
      f"{path}: unrecognised key layout (no 'visual.conv1.weight' as in OpenAI/"
      f"open_clip, no 'vision_model.*' as in HF); first keys: {sorted(sd)[:5]}")


def load_torch_checkpoint(path: str, *, act: Optional[str] = None
                          ) -> Tuple[dict, CLIPConfig, str]:
  """Reads an OpenAI/open_clip/Long-CLIP file or a HF CLIPModel directory.

  Args:
    path: a .pt/.pth/.bin/.safetensors file or a HF save_pretrained directory.
    act: activation for OpenAI-layout files, which do not store it
      ("quick_gelu" if None; open_clip's non-quickgelu models need "gelu").

  Returns:
    (params as numpy float32, CLIPConfig, format name).
  """
  if fileio.isdir(path):
    if not fileio.isfile(os.path.join(path, "config.json")):
      raise CheckpointError(f"{path}: a directory, but not a HF CLIPModel "
                            "directory (no config.json)")
    logging.info("%s: detected format hf (CLIPModel directory)", path)
    params, cfg = _load_hf_dir(path)
    checkpoint.check_finite(params, path)
    return params, cfg, "hf"
  sd = torch_files.read_state_dict(path)
  fmt = _format_of(sd, path)
  logging.info("%s: detected format %s", path, fmt)
  if fmt == "hf":
    if not fileio.isfile(os.path.join(os.path.dirname(path), "config.json")):
      raise CheckpointError(f"{path}: HF-layout weights without a config.json "
                            "next to them; pass the save_pretrained directory")
    params, cfg = _load_hf_dir(os.path.dirname(path) or ".")
  else:
    params, cfg = _load_openai(sd, path, act)
  checkpoint.check_finite(params, path)
  return params, cfg, fmt


def load_any(path: str, *, act: Optional[str] = None) -> Tuple[dict, CLIPConfig, str]:
  """Like load_torch_checkpoint, and also reads our own orbax model dirs."""
  if checkpoint.is_model_dir(path):
    logging.info("%s: detected format orbax", path)
    params, cfg = checkpoint.load_model(path)
    return params, cfg, "orbax"
  if checkpoint.is_train_workdir(path):
    logging.info("%s: detected format train_workdir (latest step's params)", path)
    params, cfg = checkpoint.load_train_params(path)
    return params, cfg, "train_workdir"
  return load_torch_checkpoint(path, act=act)
