"""CLIP's pixel normalisation (docs/method.md §1), one definition for numpy and jnp.

The data pipeline sends uint8 pixels to the device (4x less host->device
traffic and host memory than float32) and the train step normalises them
there; the eval transform normalises on the host. Both must give the same bits.

A uint8 channel value has 256 possible values, so the normalisation is a
[256, 3] float32 table, computed once in numpy with CLIP's formula
(x / 255 - mean) / std, one float32 rounding per operation. Applying it is a
lookup, which copies values and so is bit-exact on every backend. Evaluating
the formula inside XLA is not: XLA's algebraic simplifier rewrites `x / 255`
as `x * (1 / 255)`, which differs from numpy in the last bit for some values
(seen on CPU: up to 4.8e-7).

Utility module: numpy only, no data or model imports (the step, the models'
callers and data/transforms.py all use it).
"""
from typing import Any

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_formula(x: np.ndarray) -> np.ndarray:
  """(x / 255 - mean) / std in float32, numpy: the definition. x [..., 3]."""
  mean = np.asarray(CLIP_MEAN, np.float32)
  std = np.asarray(CLIP_STD, np.float32)
  return (np.asarray(x, np.float32) / np.float32(255.0) - mean) / std


# [256, 3]: row v = the normalised value of a channel holding v.
NORMALIZE_TABLE = normalize_formula(
    np.repeat(np.arange(256, dtype=np.float32)[:, None], 3, axis=1))
_FLAT_TABLE = NORMALIZE_TABLE.reshape(-1)  # index 3 * value + channel


def normalize_uint8(x: Any, xp: Any = np) -> Any:
  """uint8 [..., 3] -> float32 [..., 3] CLIP-normalised, with numpy or jnp.

  xp: the array module (numpy on the host, jax.numpy inside the step); the
  result is bit-identical either way (a table lookup, see the module
  docstring).
  """
  if x.dtype != np.uint8:
    raise TypeError(f"normalize_uint8 takes uint8 pixels, got {x.dtype}")
  if x.shape[-1] != 3:
    raise ValueError(f"pixels must be [..., 3] (RGB), got shape {x.shape}")
  index = x.astype(xp.int32) * 3 + xp.arange(3, dtype=xp.int32)  # [..., 3]
  return xp.take(xp.asarray(_FLAT_TABLE), index)


def model_input(images: Any, xp: Any = np) -> Any:
  """What the vision tower takes: uint8 batches are normalised here, float
  batches are taken as already normalised (eval, tests, older pipelines)."""
  if images.dtype == np.uint8:
    return normalize_uint8(images, xp)
  return images
