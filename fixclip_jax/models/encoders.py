"""The jitted towers that compute features: one builder for the API
(api.py), evaluation (evaluation/run.py) and the benchmark (tools/bench.py).

  image_fn, text_fn = encoders.tower_fns(model)
  image_fn(params, pixels)   # pixels [B, S, S, 3] float (normalised) -> [B, d]
  text_fn(params, tokens)    # tokens [B, T] int32, T <= context -> [B, d]

Features are L2-normalised (docs/method.md §1: CLIP compares cosines). The
params are an argument, not baked-in constants, so large models compile fast
and one compiled program serves every checkpoint of a size.

Built once per model: a flax module compares by its fields (config, dtype,
attention, remat), so every caller holding an equal `clip.CLIP` gets the same
two jitted functions and reuses what jax compiled for them (one compilation
per input shape, dtype and sharding). A second evaluation in a training run,
or a second API model of the same size, compiles nothing.
"""
import functools
from typing import Any, Callable, Tuple

import jax

from fixclip_jax.models import clip

# Distinct models whose towers stay compiled (a run has one or two).
CACHED_MODELS = 16

Features = Callable[[Any, jax.Array], jax.Array]


@functools.lru_cache(maxsize=CACHED_MODELS)
def tower_fns(model: clip.CLIP) -> Tuple[Features, Features]:
  """(image_fn, text_fn): jitted (params, batch) -> normalised [B, d].

  The batch's sharding is the caller's: jit follows its inputs (evaluation
  sends batches sharded over the mesh, the API single-device arrays).
  """

  def image_fn(params, pixels):                         # [B, S, S, 3] -> [B, d]
    out = model.apply({"params": params}, pixels, method=clip.CLIP.encode_image)
    return clip.normalize(out["embedding"])

  def text_fn(params, tokens):                          # [B, T] -> [B, d]
    out = model.apply({"params": params}, tokens, method=clip.CLIP.encode_text)
    return clip.normalize(out["embedding"])

  return jax.jit(image_fn), jax.jit(text_fn)
