"""Exact text-length buckets: token arrays cut to the smallest bucket that
holds a batch's longest caption.

Why it is exact. The text tower (models/clip.py) is causal and pools at the
end-of-text token, so a caption's features (the pooled embedding, every
layer's EOT token read by FIX-CLIP's GTA heads) depend on its tokens up to its
EOT only. Cutting the [B, C] ids to T columns, T > every row's EOT index, and
adding positions[:T] gives the same features; only float rounding may differ
(a shorter reduction, ~1e-7 relative in float32). The pool index is computed
by the model's own rule (`pool_index`), so the cut never moves it. Vision is
untouched.

Why buckets. One compiled step per shape: rounding the cut up to a few fixed
lengths keeps the number of compiled variants at most
len(long_buckets) x len(short_buckets), while a text-dominated step runs on
~the captions' real length instead of the 248-token context.

Every host must cut to the same length (the step is one SPMD program over the
global batch): `TextBuckets` takes the per-host longest caption and agrees on
the maximum over hosts with `multihost_utils.process_allgather` (a no-op with
one process). Eval and `embed` hold the whole batch on every host and cut it
locally (`cut_to_bucket`).

Utility module: numpy and jax's multihost helpers, no data or model imports.
"""
from typing import Dict, Optional, Sequence, Set, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

# Which bucket list each text array of a train batch uses.
TEXT_KEYS = ("text_long", "text_short")


def pool_index(ids: np.ndarray, eot_token_id: Optional[int] = None) -> np.ndarray:
  """Where the text tower pools, per row: the model's rule (models/clip.py):
  the first largest id (CLIP's BPE), or the first `eot_token_id`. ids [B, C]."""
  ids = np.asarray(ids)
  if eot_token_id is None:
    return np.argmax(ids, axis=-1)
  return np.argmax(ids == eot_token_id, axis=-1)


def longest_caption(ids: np.ndarray, eot_token_id: Optional[int] = None) -> int:
  """Columns the batch needs: the largest pool index + 1 (0 for no rows)."""
  if ids.shape[0] == 0:
    return 0
  return int(pool_index(ids, eot_token_id).max()) + 1


def bucket_length(longest: int, buckets: Sequence[int], width: int) -> int:
  """The smallest bucket >= longest, below the array's width; else the width
  (buckets empty = off = the width)."""
  fitting = [b for b in sorted(buckets) if longest <= b < width]
  return fitting[0] if fitting else width


def check_buckets(buckets: Sequence[int], name: str) -> Tuple[int, ...]:
  """The buckets as a sorted tuple of positive ints (ValueError otherwise)."""
  out = tuple(sorted(int(b) for b in buckets))
  if any(b < 1 for b in out) or len(set(out)) != len(out):
    raise ValueError(f"{name}={tuple(buckets)}: buckets must be distinct "
                     "positive lengths")
  return out


def cut_to_bucket(ids: np.ndarray, buckets: Sequence[int],
                  eot_token_id: Optional[int] = None) -> np.ndarray:
  """ids [B, C] -> [B, T], T the bucket of this batch's longest caption.

  Local: for batches every host holds whole (eval, embed). A view, no copy.
  """
  ids = np.asarray(ids)
  if not buckets:
    return ids
  length = bucket_length(longest_caption(ids, eot_token_id), buckets, ids.shape[1])
  return ids[:, :length]


def max_over_hosts(values: np.ndarray) -> np.ndarray:
  """Elementwise max of an int vector over all processes (a collective: every
  process must call it, with the same shape; no-op with one process)."""
  values = np.asarray(values, np.int32)
  if jax.process_count() == 1:
    return values
  gathered = np.asarray(multihost_utils.process_allgather(values))  # [P, n]
  return gathered.reshape(-1, values.shape[0]).max(axis=0)


class TextBuckets:
  """Cuts a train batch's text arrays to agreed buckets; counts the variants.

  Call it on every host with the host's batch (a collective with more than
  one process). `variants` is the set of (key, length) tuples seen, i.e. the
  text shapes the jitted step has been compiled for.
  """

  def __init__(self, long_buckets: Sequence[int] = (),
               short_buckets: Sequence[int] = (),
               eot_token_id: Optional[int] = None):
    self.buckets = {"text_long": check_buckets(long_buckets, "data.long_buckets"),
                    "text_short": check_buckets(short_buckets, "data.short_buckets")}
    self.eot_token_id = eot_token_id
    self.variants: Set[Tuple[Tuple[str, int], ...]] = set()

  @classmethod
  def from_data_config(cls, data, eot_token_id: Optional[int] = None
                       ) -> "TextBuckets":
    """From the run config's `data` block: long_buckets / short_buckets
    (empty = off)."""
    return cls(data.get("long_buckets") or (), data.get("short_buckets") or (),
               eot_token_id)

  @property
  def enabled(self) -> bool:
    return any(self.buckets.values())

  def max_variants(self) -> int:
    """The most compiled step variants bucketing can cause: len(long) x
    len(short) when each list ends at its array's width, as the defaults do
    (a batch longer than every bucket keeps the full width: one more each)."""
    return int(np.prod([max(len(b), 1) for b in self.buckets.values()]))

  def lengths(self, batch: Dict[str, np.ndarray]) -> Dict[str, int]:
    """{key: agreed length} of the text arrays in `batch` (a collective)."""
    keys = [k for k in TEXT_KEYS if k in batch]
    longest = max_over_hosts(np.asarray(
        [longest_caption(batch[k], self.eot_token_id) for k in keys]))
    return {k: bucket_length(int(n), self.buckets[k], batch[k].shape[1])
            for k, n in zip(keys, longest)}

  def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The batch with text_long / text_short cut (views); other keys as given."""
    if not self.enabled:
      return batch
    lengths = self.lengths(batch)
    variant = tuple(sorted(lengths.items()))
    if variant not in self.variants:
      self.variants.add(variant)
      logging.info("Text buckets: new step shape %s; %d compiled variant(s) "
                   "(at most %d)", dict(variant), len(self.variants),
                   self.max_variants())
    return {k: (v[:, :lengths[k]] if k in lengths else v) for k, v in batch.items()}


def eval_buckets(data) -> Tuple[int, ...]:
  """Eval and embed texts (one context, long and short captions alike): the
  union of the `data` block's long_buckets and short_buckets."""
  return tuple(sorted(set(data.get("long_buckets") or ()) |
                      set(data.get("short_buckets") or ())))
