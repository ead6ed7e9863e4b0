"""Contrastive objectives: CLIP, Long-CLIP (method.md §2) and FIX-CLIP (§3).

Every objective takes the model's outputs as a dict and returns
`(loss, terms)` where `terms` holds each term separately for logging. Losses are
written over the *global* batch: under `jax.jit` with batch-sharded inputs, XLA
inserts the all-gathers (with gradient) that PyTorch implementations write by
hand.
"""
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from fixclip_jax.models.layers import normalize

Array = jax.Array

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips exp(logit_scale) at 100.


def temperature(logit_scale: Array) -> Array:
  """exp(logit_scale) clipped at 100, the multiplier of cosine similarities."""
  return jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), MAX_LOGIT_SCALE))


def infonce(zimg: Array, ztxt: Array, logit_scale: Array,
            label_smoothing: float = 0.0) -> Array:
  """Symmetric InfoNCE between matching rows of two [B, d] feature batches.

  Features are L2-normalised here. Cross-entropy with label smoothing as
  Long-CLIP trains (method.md §2: 0.1), averaged over both directions.
  """
  zimg, ztxt = normalize(zimg), normalize(ztxt)
  logits = temperature(logit_scale) * zimg @ ztxt.T                 # [B, B]
  n = logits.shape[0]
  labels = optax.smooth_labels(jnp.eye(n, dtype=jnp.float32), label_smoothing)
  i2t = optax.softmax_cross_entropy(logits, labels).mean()
  t2i = optax.softmax_cross_entropy(logits.T, labels).mean()
  return 0.5 * (i2t + t2i)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _project_top_components(xc: Array, num_components: int) -> Array:
  """xc P P^T, P = the top right-singular vectors of the centred batch xc."""
  _, _, vt = jnp.linalg.svd(xc, full_matrices=False)                 # [min(B,d), d]
  p = vt[:num_components].T                                          # [d, k]
  return (xc @ p) @ p.T


@_project_top_components.defjvp
def _project_top_components_jvp(num_components, primals, tangents):
  """Derivative through the projector P = V_k V_k^T only.

  Differentiating U, S and V one by one (jnp.linalg.svd's rule) divides by the
  gaps between *all* singular values, which are zero on rank-deficient batches
  (centring alone makes B <= d batches rank-deficient) and give NaN. The
  projector only depends on the gaps between kept (i) and dropped (j)
  components: dP = V_r G V_k^T + V_k G^T V_r^T with
  G_ji = v_j^T dC v_i / (l_i - l_j), C = xc^T xc, l = s^2. A zero gap arises
  only where both eigenvalues vanish, and then v_j^T dC v_i = 0 too, so those
  terms are set to 0.
  """
  (xc,), (dxc,) = primals, tangents
  _, s, vt = jnp.linalg.svd(xc, full_matrices=True)                  # vt [d, d]
  d = vt.shape[1]
  k = num_components
  lam = jnp.zeros((d,), jnp.float32).at[:s.shape[0]].set(s * s)      # [d]
  v = vt.T                                                           # [d, d]
  vk, vr = v[:, :k], v[:, k:]                                        # [d,k] [d,d-k]
  p = vk @ vk.T
  dc = dxc.T @ xc + xc.T @ dxc                                       # [d, d]
  gap = lam[:k][None, :] - lam[k:][:, None]                          # [d-k, k]
  tol = 1e-6 * jnp.maximum(lam[0], 1e-30)
  safe = gap > tol
  g = jnp.where(safe, (vr.T @ dc @ vk) / jnp.where(safe, gap, 1.0), 0.0)
  dp = vr @ g @ vk.T + vk @ g.T @ vr.T
  return xc @ p, dxc @ p + xc @ dp


def pca_reconstruct(x: Array, num_components: int = 32) -> Array:
  """Primary-component matching's coarse feature (method.md §2).

  x: [B, d] (L2-normalised image features). Centre by the batch mean, SVD in
  float32, keep the top `num_components` right-singular vectors P and return
  X_c P P^T + mean, not renormalised. Gradients flow through the SVD (through
  the projector, so that rank-deficient batches stay finite).
  """
  x32 = x.astype(jnp.float32)
  mean = x32.mean(axis=0, keepdims=True)                             # [1, d]
  k = min(num_components, *x32.shape)
  return _project_top_components(x32 - mean, k) + mean


def pca_reconstruct_per_shard(x: Array, num_components: int = 32,
                              num_shards: int = 1) -> Array:
  """PCA per device-local batch, as Long-CLIP does on each GPU (method.md §2).

  The global batch [B, d] is split into `num_shards` contiguous groups (the
  data-parallel shards, so with a batch sharded over them every SVD stays on
  its own device) and each is reconstructed from its own components.
  """
  b, d = x.shape
  if b % num_shards:
    raise ValueError(f"Batch {b} is not divisible into {num_shards} PCA shards")
  groups = x.reshape(num_shards, b // num_shards, d)                 # [S, B/S, d]
  recon = jax.vmap(lambda g: pca_reconstruct(g, num_components))(groups)
  return recon.reshape(b, d)


def count_nonfinite(*xs: Array) -> Array:
  """Number of NaN/Inf entries over arrays (an int32 scalar)."""
  return sum(jnp.sum(~jnp.isfinite(x)).astype(jnp.int32) for x in xs)


def zero_nonfinite(x: Array) -> Array:
  """Replaces NaN/Inf with 0 so a bad batch cannot crash LAPACK/cuSOLVER's SVD.

  The step that sees such a batch is skipped (see train.py); this only keeps the
  computation well-defined until then.
  """
  return jnp.where(jnp.isfinite(x), x, 0.0)


def clip_objective(out: dict, *, label_smoothing: float = 0.0) -> tuple:
  """Plain CLIP fine-tuning: InfoNCE(image, text_long)."""
  l = infonce(out["image"]["embedding"], out["text_long"]["embedding"],
              out["logit_scale"], label_smoothing)
  return l, {"loss_clip": l}


def longclip_objective(out: dict, *, short_weight: float = 1.0,
                       label_smoothing: float = 0.1, pcm: bool = True,
                       pcm_components: int = 32, pcm_shards: int = 1) -> tuple:
  """Long-CLIP: L_long + w_short * L_short (method.md §2).

  out: {"image": {"embedding": [B, d]}, "text_long": ..., "text_short": ...,
        "logit_scale": ()}. L_long contrasts the full image feature with the long
  caption; L_short contrasts its primary components (PCM) with the short one.
  """
  img = normalize(out["image"]["embedding"])
  nonfinite = count_nonfinite(img)
  img = zero_nonfinite(img)
  coarse = pca_reconstruct_per_shard(img, pcm_components, pcm_shards) if pcm else img
  scale = out["logit_scale"]
  l_long = infonce(img, out["text_long"]["embedding"], scale, label_smoothing)
  l_short = infonce(coarse, out["text_short"]["embedding"], scale, label_smoothing)
  loss = l_long + short_weight * l_short
  return loss, {"loss_long": l_long, "loss_short": l_short,
                "nonfinite_features": nonfinite}


def gta_losses(image_groups: Array, text_groups: Array, logit_scale: Array,
               first_group: int, label_smoothing: float = 0.0) -> Array:
  """InfoNCE per hierarchical group i = first_group..G (1-based, method.md §3).

  image_groups/text_groups: [G, B, d'] group middle features. Returns [G-K+1].
  """
  g = image_groups.shape[0]
  if not 1 <= first_group <= g:
    raise ValueError(f"gta first_group={first_group} must be in [1, {g}]")
  sel = slice(first_group - 1, g)
  return jax.vmap(lambda zi, zt: infonce(zi, zt, logit_scale, label_smoothing))(
      image_groups[sel], text_groups[sel])


def fixclip_objective(out: dict, *, short_weight: float = 1.0,
                      gta_weights: Sequence[float] = (0.5, 0.5),
                      gta_first_group: int = 3, label_smoothing: float = 0.0,
                      pcm: bool = False, pcm_components: int = 32,
                      pcm_shards: int = 1) -> tuple:
  """FIX-CLIP: L_long + w_short L_short + sum_{i=K..G} w_i L_mi (method.md §3).

  out: {"image": raw-image tower dict (with "gta": [G, B, d']),
        "image_masked": masked-image tower dict, "text_long": long-caption tower
        dict (with "gta"), "text_short": short-caption tower dict,
        "logit_scale": ()}.
  L_long: raw image <-> long caption; L_short: masked image <-> short caption
  (optionally through PCM); L_mi: the hierarchical groups of the long branch.
  """
  scale = out["logit_scale"]
  img = normalize(out["image"]["embedding"])
  img_masked = normalize(out["image_masked"]["embedding"])
  nonfinite = count_nonfinite(img, img_masked)
  img, img_masked = zero_nonfinite(img), zero_nonfinite(img_masked)
  if pcm:
    img_masked = pca_reconstruct_per_shard(img_masked, pcm_components, pcm_shards)
  l_long = infonce(img, out["text_long"]["embedding"], scale, label_smoothing)
  l_short = infonce(img_masked, out["text_short"]["embedding"], scale,
                    label_smoothing)
  terms = {"loss_long": l_long, "loss_short": l_short,
           "nonfinite_features": nonfinite}
  loss = l_long + short_weight * l_short
  if "gta" in out["image"]:
    l_groups = gta_losses(zero_nonfinite(out["image"]["gta"]),
                          out["text_long"]["gta"], scale, gta_first_group,
                          label_smoothing)
    weights = jnp.asarray(gta_weights, jnp.float32)
    if weights.shape != l_groups.shape:
      raise ValueError(f"gta_weights {tuple(gta_weights)} need one weight per "
                       f"group {gta_first_group}..G ({l_groups.shape[0]} groups)")
    for i in range(l_groups.shape[0]):
      terms[f"loss_gta_{gta_first_group + i}"] = l_groups[i]
    loss = loss + jnp.sum(weights * l_groups)
  return loss, terms


OBJECTIVES = {
    "clip": clip_objective,
    "longclip": longclip_objective,
    "fixclip": fixclip_objective,
}
