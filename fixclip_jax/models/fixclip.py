"""FIX-CLIP's additions to CLIP (docs/method.md §3): regional prompts and their
unidirectional attention mask, image masking for the short branch, and the
hierarchical-alignment (GTA) heads.

Everything here is pure functions or small Linen modules that the towers in
`clip.py` call; with the FIX-CLIP fields of `CLIPConfig` at their defaults
(no prompts, no GTA heads, no mask token) the towers are exactly OpenAI CLIP.
"""
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fixclip_jax.models import layers

Array = jax.Array


# ----------------------------------------------------------------------------
# Regional prompts.

# How patches are split among the M prompts (patch_regions): "strips" =
# contiguous runs of the raster order (the paper's mask formula), "grid" = 2-D
# rectangles.
REGION_LAYOUTS = ("strips", "grid")
# What a prompted layer's prompt tokens are (models/clip.py Transformer):
# "carry" = the previous prompted layer's prompt outputs plus this layer's
# parameters; "fresh" = this layer's parameters only (outputs discarded, so the
# regional mask reaches no output: the ablation's control).
PROMPT_MODES = ("carry", "fresh")
# How the masked short branch hides patches (step.image_masks, flops): a mask
# token in place of each hidden patch, or the hidden patches left out (MAE).
MASKING_MODES = ("replace", "drop")

def grid_shape(num_regions: int) -> Tuple[int, int]:
  """rows x cols of a 2-D region grid, as square as num_regions allows (4 -> 2x2)."""
  rows = int(math.isqrt(num_regions))
  while num_regions % rows:
    rows -= 1
  return rows, num_regions // rows


def patch_regions(grid_size: int, num_regions: int, layout: str = "strips") -> np.ndarray:
  """Region id of each patch, in raster order: int32 [grid_size**2].

  "strips": num_regions contiguous runs of the raster order (the paper's mask
  formula, docs/method.md §3; N not divisible by M gives runs of floor or ceil
  N/M). "grid": a rows x cols grid of rectangles over the patch grid (ours;
  4 regions = the 4 quadrants).
  """
  n = grid_size * grid_size
  if layout == "grid":
    rows, cols = grid_shape(num_regions)
    r = np.arange(grid_size) * rows // grid_size                  # [g]
    c = np.arange(grid_size) * cols // grid_size                  # [g]
    return (r[:, None] * cols + c[None, :]).reshape(n).astype(np.int32)
  if layout == "strips":
    return (np.arange(n) * num_regions // n).astype(np.int32)
  raise ValueError(f"Unknown region layout {layout!r}; use "
                   f"{' | '.join(REGION_LAYOUTS)}")


def regional_prompt_mask(regions: Array, num_prompts: int) -> Array:
  """Unidirectional attention mask for [CLS, P_1..P_M, patches] (docs/method.md §3).

  regions: int [..., Np], the region id of each patch token present (all of
    them, or the kept ones when masked patches are dropped).
  Returns bool [..., T, T] with T = 1 + M + Np, True = may attend:
    CLS     -> everything;
    patch   -> CLS and patches, never prompts (patch features stay CLIP's);
    prompt j -> itself and the patches of region j.
  """
  regions = jnp.asarray(regions)
  lead = regions.shape[:-1]
  m = num_prompts
  # A region label per key position: CLS = -1, prompt j = j, patch = its region.
  key_region = jnp.concatenate([
      jnp.full(lead + (1,), -1, jnp.int32),
      jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), lead + (m,)),
      regions.astype(jnp.int32)], axis=-1)                         # [..., T]
  t = key_region.shape[-1]
  pos = jnp.arange(t)
  is_prompt = (pos >= 1) & (pos < 1 + m)                            # [T]
  is_patch = pos >= 1 + m
  q_prompt = is_prompt[:, None]
  # Prompt rows: itself, or a patch of its own region.
  prompt_row = ((pos[:, None] == pos[None, :]) |
                (is_patch[None, :] & (key_region[..., :, None] == key_region[..., None, :])))
  other_row = ~is_prompt[None, :]                                   # CLS & patches
  other_row = other_row | (pos[:, None] == 0)                       # CLS row: all
  return jnp.where(q_prompt, prompt_row, other_row)


def prompt_layer_active(layer: int, prompt_layers: Optional[Tuple[int, int]]) -> bool:
  """Whether layer `layer` (0-based) gets prompts; None = every layer."""
  if prompt_layers is None:
    return True
  start, stop = prompt_layers
  return start <= layer < stop


# ----------------------------------------------------------------------------
# Image masking for the short branch.

def random_patch_mask(rng: Array, batch: int, num_patches: int,
                      ratio: float) -> Tuple[Array, Array]:
  """Chooses round(ratio * N) patches to mask per image, from a PRNG key.

  Returns (masked bool [B, N] True = masked, keep_index int32 [B, N - k]: the
  kept patches in raster order, for the token-dropping variant).
  """
  num_masked = int(round(ratio * num_patches))
  if not 0 <= num_masked < num_patches:
    raise ValueError(f"mask ratio {ratio} leaves no visible patch of {num_patches}")
  noise = jax.random.uniform(rng, (batch, num_patches))
  order = jnp.argsort(noise, axis=-1)                                # [B, N]
  ranks = jnp.argsort(order, axis=-1)
  masked = ranks < num_masked                                        # [B, N]
  keep_index = jnp.sort(order[:, num_masked:], axis=-1).astype(jnp.int32)
  return masked, keep_index


# ----------------------------------------------------------------------------
# Hierarchical feature alignment (GTA).

def gaussian_group_weights(layers_per_group: int, sigma: float = 1.0) -> np.ndarray:
  """Weights over a group's layers, a Gaussian centred on its last layer (§3).

  Normalised to sum to 1 (our decision; the paper gives the shape only).
  """
  s = np.arange(layers_per_group, dtype=np.float32)
  w = np.exp(-0.5 * ((s - (layers_per_group - 1)) / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


class GTAHeads(nn.Module):
  """Per-group Linear + LayerNorm over Gaussian-pooled per-layer tokens (§3)."""
  num_groups: int
  out_dim: int
  sigma: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, layer_tokens: Array) -> Array:
    """layer_tokens: [L, B, w] CLS/EOT per layer -> [G, B, out_dim] float32."""
    num_layers = layer_tokens.shape[0]
    if num_layers % self.num_groups:
      raise ValueError(f"{num_layers} layers do not split into {self.num_groups} groups")
    s = num_layers // self.num_groups
    w = jnp.asarray(gaussian_group_weights(s, self.sigma))          # [S]
    grouped = layer_tokens.reshape(self.num_groups, s, *layer_tokens.shape[1:])
    pooled = jnp.einsum("gsbw,s->gbw", grouped.astype(jnp.float32), w)  # [G, B, w]
    outs = []
    for g in range(self.num_groups):
      y = nn.Dense(self.out_dim, dtype=self.dtype, name=f"linear_{g}")(
          pooled[g].astype(self.dtype))
      outs.append(layers.LayerNorm(jnp.float32, name=f"ln_{g}")(y))
    return jnp.stack(outs)                                           # [G, B, d]
