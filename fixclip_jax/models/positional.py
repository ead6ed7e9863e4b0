"""Text positions: Long-CLIP's knowledge-preserved stretching (KPS) and the
two-table scheme (docs/method.md §2), and the one function that fits a
checkpoint's text positions to a model (`fit_text_positions`), used by
init_from, `convert --stretch` and every export.

CLIP's 77 text positions are stretched to 248 = keep + factor * (77 - keep) with
keep=20, factor=4: the first `keep` rows (well trained, they carry most of
CLIP's short-text knowledge) are copied, the rest are linearly interpolated
`factor`x, and the last `factor` rows are extrapolated from the last two
original rows.
"""
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

# Long-CLIP keeps (and freezes) the first 20 positions (docs/method.md §2).
LONGCLIP_KEEP = 20


def stretched_length(length: int, keep: int = LONGCLIP_KEEP, factor: int = 4) -> int:
  """Rows after stretching: keep + factor * (length - keep); 77 -> 248."""
  return keep + factor * (length - keep)


def stretch_positional_embedding(pe, keep: int = LONGCLIP_KEEP, factor: int = 4):
  """Knowledge-preserved stretching of a [L, w] table (docs/method.md §2).

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


def combined_positional_embedding(pe, pe_res, keep: Optional[int]):
  """The table the model actually adds: rows < keep from pe, the rest from pe_res."""
  if keep is None or pe_res is None:
    return pe
  xp = jnp if isinstance(pe, jax.Array) else np
  rows = xp.arange(pe.shape[0])[:, None] < keep
  return xp.where(rows, pe, pe_res)


def fit_text_positions(params: dict, *, src_length: int, src_keep: Optional[int],
                       length: int, keep: Optional[int],
                       source: str = "params") -> dict:
  """Fits the text position table(s) of `params` to a model's.

  src_length/src_keep: the checkpoint's context length and two-table split
  (None = one table); length/keep: the model's. Steps, each only if needed:
    1. fold two tables into the one the model adds (when the target has one
       table, needs stretching, or splits at another row);
    2. stretch with KPS to `length`, keeping `keep` rows (Long-CLIP's 20 when
       the target has one table);
    3. create the residual table as a copy of the (stretched) table.
  Nothing else in params changes; the model's function is unchanged by 1 and 3.
  Returns a new params tree.
  """
  text = dict(params["text"])
  pe = text["positional_embedding"]
  pe_res = text.pop("positional_embedding_res", None)
  if (pe_res is None) != (src_keep is None):
    raise ValueError(f"{source}: positional_keep={src_keep} but the params "
                     f"{'lack' if pe_res is None else 'hold'} positional_embedding_res")
  if pe.shape[0] != src_length:
    raise ValueError(f"{source}: text/positional_embedding has {pe.shape[0]} rows, "
                     f"expected context_length {src_length}")
  if pe_res is not None and (keep is None or keep != src_keep or length != src_length):
    pe, pe_res = combined_positional_embedding(pe, pe_res, src_keep), None
  if length != src_length:
    stretch_keep = LONGCLIP_KEEP if keep is None else keep
    factor = (length - stretch_keep) // max(src_length - stretch_keep, 1)
    if (src_length - stretch_keep < 2 or factor < 1 or
        stretched_length(src_length, stretch_keep, factor) != length):
      raise ValueError(f"{source}: cannot stretch a {src_length}-row text position "
                       f"table to {length} rows (rows = keep + factor * "
                       f"({src_length} - keep) with keep={stretch_keep})")
    logging.info("%s: stretching text positions %d -> %d (keep=%d, factor=%d)",
                 source, src_length, length, stretch_keep, factor)
    pe = stretch_positional_embedding(pe, stretch_keep, factor)
  text["positional_embedding"] = pe
  if keep is not None:
    xp = jnp if isinstance(pe, jax.Array) else np
    text["positional_embedding_res"] = xp.array(pe) if pe_res is None else pe_res
  return {**params, "text": text}
