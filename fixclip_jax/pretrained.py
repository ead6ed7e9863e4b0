"""Starting a model from pretrained weights (config.init_from).

Any checkpoint loader.py reads (OpenAI / open_clip / Long-CLIP / FIX-CLIP
PyTorch files, Hugging Face directories, our model dirs, training workdirs) is
fitted to the run's model: text positions by `positional.fit_text_positions`
(KPS 77 -> 248, the two-table scheme), parameters the checkpoint lacks keep a
fresh initialisation, and the temperature can be reset (docs/method.md §2).
"""
from absl import logging
import jax
import numpy as np

from fixclip_jax import loader
from fixclip_jax.models import positional
from fixclip_jax.models.params import flatten_params
from fixclip_jax.models.params import unflatten_params
from fixclip_jax.models.sizes import CLIPConfig


def adapt_pretrained(pretrained: dict, src_cfg: CLIPConfig, fresh: dict,
                     cfg: CLIPConfig, *, logit_scale: float = 0.0,
                     source: str = "init_from") -> dict:
  """Fits pretrained CLIP / Long-CLIP / FIX-CLIP params to the model `cfg`.

  - Text positions: `positional.fit_text_positions` (stretching, folding or
    creating the two tables to match cfg.context_length / positional_keep).
  - Parameters the checkpoint lacks (prompts, mask token, GTA heads) keep
    their fresh initialisation and are listed in the log; pretrained ones
    load unchanged. A shape mismatch is an error naming the key and both
    shapes; pretrained keys the model lacks are dropped with a warning.
  - logit_scale != 0 resets the temperature (Long-CLIP: ln 100).
  """
  pretrained = positional.fit_text_positions(
      pretrained, src_length=src_cfg.context_length,
      src_keep=src_cfg.positional_keep, length=cfg.context_length,
      keep=cfg.positional_keep, source=source)
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
  """init_from: any checkpoint loader.py reads, adapted to `cfg`."""
  params, src_cfg, fmt = loader.load_any(path)
  logging.info("init_from %s (%s): %s", path, fmt, src_cfg)
  return adapt_pretrained(jax.device_get(params), src_cfg, jax.device_get(fresh),
                          cfg, logit_scale=logit_scale, source=path)
