"""Long-CLIP's knowledge-preserved positional stretching (method.md §2).

CLIP's 77 text positions are stretched to 248 = keep + factor * (77 - keep) with
keep=20, factor=4: the first `keep` rows (well trained, they carry most of CLIP's short-text knowledge) are copied,
the rest are linearly interpolated `factor`x, and the last `factor` rows are
extrapolated from the last two original rows.
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def stretched_length(length: int, keep: int = 20, factor: int = 4) -> int:
  """Rows after stretching: keep + factor * (length - keep); 77 -> 248."""
  return keep + factor * (length - keep)


def stretch_positional_embedding(pe, keep: int = 20, factor: int = 4):
  """Knowledge-preserved stretching of a [L, w] table (method.md §2).

    new[i]                    = old[i]                                  i < keep
    new[keep + f*i + k]       = (1 - k/f) old[keep+i] + (k/f) old[keep+i+1]
                                                         i < L-keep-1, k < f
    new[keep + f*(L-keep-1)+j] = old[L-1] + j (old[L-1] - old[L-2]) / f,  j < f

  Works on numpy or jax arrays; returns the same kind, float32 math.
  """
  xp = jnp if isinstance(pe, jax.Array) else np
  length, _ = pe.shape
  if not 0 <= keep <= length - 2:
    raise ValueError(f"keep={keep} must be in [0, {length - 2}] for a {length}-row table")
  if factor < 1:
    raise ValueError(f"factor={factor} must be >= 1")
  old = pe.astype(xp.float32)
  frac = xp.arange(factor, dtype=xp.float32) / factor               # [f] = k/f
  lo, hi = old[keep:length - 1], old[keep + 1:length]               # [L-keep-1, w]
  inner = ((1 - frac)[None, :, None] * lo[:, None] +
           frac[None, :, None] * hi[:, None])                       # [L-keep-1, f, w]
  step = (old[length - 1] - old[length - 2]) / factor                # [w]
  tail = old[length - 1][None] + xp.arange(factor, dtype=xp.float32)[:, None] * step
  out = xp.concatenate([old[:keep], inner.reshape(-1, pe.shape[1]), tail], axis=0)
  assert out.shape[0] == stretched_length(length, keep, factor)
  return out.astype(pe.dtype)


def stretch_text_positions(params: dict, keep: int = 20, factor: int = 4,
                           two_tables: bool = True) -> dict:
  """Prepares CLIP params for long-text training (method.md §2).

  Stretches `text/positional_embedding`; with `two_tables` also creates
  `text/positional_embedding_res` initialised to the same stretched table (the
  model reads rows < keep from the first, which the optimizer keeps frozen, and
  rows >= keep from the second). Returns a new params tree.
  """
  text = dict(params["text"])
  if "positional_embedding_res" in text:
    raise ValueError("Params already hold positional_embedding_res: "
                     "they are already stretched (a Long-CLIP checkpoint)")
  stretched = stretch_positional_embedding(text["positional_embedding"], keep, factor)
  text["positional_embedding"] = stretched
  if two_tables:
    text["positional_embedding_res"] = stretched.copy() if isinstance(
        stretched, np.ndarray) else jnp.array(stretched)
  return {**params, "text": text}


def combined_positional_embedding(pe, pe_res, keep: Optional[int]):
  """The table the model actually adds: rows < keep from pe, the rest from pe_res."""
  if keep is None or pe_res is None:
    return pe
  xp = jnp if isinstance(pe, jax.Array) else np
  rows = xp.arange(pe.shape[0])[:, None] < keep
  return xp.where(rows, pe, pe_res)
