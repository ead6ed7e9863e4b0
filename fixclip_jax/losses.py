"""Contrastive objectives: CLIP, Long-CLIP (docs/method.md §2) and FIX-CLIP (§3).

Every objective takes the model's outputs as a dict and returns
`(loss, terms)` where `terms` holds each term separately for logging. Losses are
written over the *global* batch: under `jax.jit` with batch-sharded inputs, XLA
inserts the all-gathers (with gradient) that PyTorch implementations write by
hand. The official Long-CLIP forward (model/model_longclip.py, `forward` and
`PCA`) computes per GPU the rows of the same global logits matrices; the mean
of its per-GPU losses is the global-batch loss computed here.
"""
import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from fixclip_jax.models.layers import normalize

Array = jax.Array

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips exp(logit_scale) at 100.


def clamp_logit_scale(logit_scale: Array, max_logit_scale: Optional[float]) -> Array:
  """logit_scale capped at max_logit_scale (None = not capped, as Long-CLIP).

  Below and *at* the cap the value and its gradient pass unchanged
  (jnp.minimum would halve the gradient at the tie, where Long-CLIP's reset
  to ln 100 puts it); above the cap the gradient is 0.
  """
  logit_scale = logit_scale.astype(jnp.float32)
  if max_logit_scale is None:
    return logit_scale
  return jnp.where(logit_scale > max_logit_scale,
                   jnp.asarray(max_logit_scale, jnp.float32), logit_scale)


def temperature(logit_scale: Array,
                max_logit_scale: Optional[float] = MAX_LOGIT_SCALE) -> Array:
  """exp(logit_scale), capped as clamp_logit_scale: the similarity multiplier."""
  return jnp.exp(clamp_logit_scale(logit_scale, max_logit_scale))


def infonce(zimg: Array, ztxt: Array, logit_scale: Array,
            label_smoothing: float = 0.0) -> Array:
  """Symmetric InfoNCE between matching rows of two prepared [B, d] batches.

  The features enter the logits `exp(logit_scale) * zimg @ ztxt^T` as they are:
  callers L2-normalise them (and Long-CLIP's PCA reconstruction is used
  unnormalised, docs/method.md §2). logit_scale is used as given (the train
  step applies config.loss.max_logit_scale). Cross-entropy with label
  smoothing (Long-CLIP: 0.1), averaged over both directions.
  """
  logits = jnp.exp(logit_scale.astype(jnp.float32)) * (
      zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T)        # [B, B]
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
  """Primary-component matching's coarse feature (docs/method.md §2).

  x: [B, d] (L2-normalised image features). Centre by the batch mean, SVD in
  float32, keep the top `num_components` right-singular vectors P and return
  X_c P P^T + mean, not renormalised. Gradients flow through the SVD (through
  the projector, so that rank-deficient batches stay finite).
  """
  x32 = x.astype(jnp.float32)
  mean = x32.mean(axis=0, keepdims=True)                             # [1, d]
  k = min(num_components, *x32.shape)
  return _project_top_components(x32 - mean, k) + mean


def pca_reconstruct_groups(x: Array, num_components: int = 32,
                           group_size: int = 128) -> Array:
  """PCA per group of `group_size` consecutive rows (docs/method.md §2).

  Long-CLIP reconstructs each GPU's 128 features from their own components.
  Here the group size is a knob independent of the device count: the global
  batch [B, d] is split into B / group_size contiguous groups (one group of B
  when B <= group_size). With the batch sharded contiguously over devices, a
  group stays on one device whenever the per-device batch is a multiple of
  group_size.
  """
  b, d = x.shape
  group = min(group_size, b)
  if b % group:
    raise ValueError(f"loss.pcm_group_size={group_size} does not divide the "
                     f"batch of {b}")
  groups = x.reshape(b // group, group, d)                          # [G, g, d]
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
  l = infonce(normalize(out["image"]["embedding"]),
              normalize(out["text_long"]["embedding"]), out["logit_scale"],
              label_smoothing)
  return l, {"loss_clip": l}


def longclip_objective(out: dict, *, short_weight: float = 1.0,
                       label_smoothing: float = 0.1, pcm: bool = True,
                       pcm_components: int = 32, pcm_group_size: int = 128) -> tuple:
  """Long-CLIP: L_long + w_short * L_short (docs/method.md §2).

  out: {"image": {"embedding": [B, d]}, "text_long": ..., "text_short": ...,
        "logit_scale": ()}. L_long contrasts the full image feature with the long
  caption; L_short contrasts its primary components (PCM: the PCA
  reconstruction, not renormalised) with the short one.
  """
  img = normalize(out["image"]["embedding"])
  nonfinite = count_nonfinite(img)
  img = zero_nonfinite(img)
  coarse = pca_reconstruct_groups(img, pcm_components, pcm_group_size) if pcm else img
  scale = out["logit_scale"]
  l_long = infonce(img, normalize(out["text_long"]["embedding"]), scale,
                   label_smoothing)
  l_short = infonce(coarse, normalize(out["text_short"]["embedding"]), scale,
                    label_smoothing)
  loss = l_long + short_weight * l_short
  return loss, {"loss_long": l_long, "loss_short": l_short,
                "nonfinite_features": nonfinite}


def gta_losses(image_groups: Array, text_groups: Array, logit_scale: Array,
               first_group: int, label_smoothing: float = 0.0) -> Array:
  """InfoNCE per hierarchical group i = first_group..G (1-based, docs/method.md §3).

  image_groups/text_groups: [G, B, d'] group middle features (L2-normalised
  here). Returns [G-K+1].
  """
  g = image_groups.shape[0]
  if not 1 <= first_group <= g:
    raise ValueError(f"gta first_group={first_group} must be in [1, {g}]")
  sel = slice(first_group - 1, g)
  return jax.vmap(lambda zi, zt: infonce(normalize(zi), normalize(zt), logit_scale,
                                         label_smoothing))(
      image_groups[sel], text_groups[sel])


def fixclip_objective(out: dict, *, short_weight: float = 1.0,
                      gta_weights: Sequence[float] = (0.5, 0.5),
                      gta_first_group: int = 3, label_smoothing: float = 0.0,
                      pcm: bool = False, pcm_components: int = 32,
                      pcm_group_size: int = 128) -> tuple:
  """FIX-CLIP: L_long + w_short L_short + sum_{i=K..G} w_i L_mi (docs/method.md §3).

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
    img_masked = pca_reconstruct_groups(img_masked, pcm_components, pcm_group_size)
  l_long = infonce(img, normalize(out["text_long"]["embedding"]), scale,
                   label_smoothing)
  l_short = infonce(img_masked, normalize(out["text_short"]["embedding"]), scale,
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


@dataclasses.dataclass(frozen=True)
class Objective:
  """Everything the rest of the code needs to know about an objective.

  The train step, flops.py and the benchmark read these fields; none of them
  compares objective names. Adding an objective is one `OBJECTIVES` entry.

  loss_fn: (model outputs dict, **kwargs) -> (loss, {term: value}).
  config_args: names of `config.loss` fields passed to loss_fn as keywords.
  short_caption: runs the text tower on the short caption ("text_short").
  masked_image: runs the vision tower a second time on the masked image
    ("image_masked", config.masking).
  gta: reads the GTA heads' group features ("gta" in the tower dicts).
  pcm: can contrast PCA reconstructions (config.loss.pcm, pcm_components,
    pcm_group_size among its config_args).
  """
  loss_fn: Callable[..., Tuple[Array, dict]]
  config_args: Tuple[str, ...] = ()
  short_caption: bool = False
  masked_image: bool = False
  gta: bool = False
  pcm: bool = False

  def bind(self, loss_config) -> Callable:
    """loss_fn with its config.loss arguments: (outputs) -> (loss, terms)."""
    kwargs = {}
    for name in self.config_args:
      value = loss_config[name]
      kwargs[name] = tuple(value) if isinstance(value, list) else value
    return functools.partial(self.loss_fn, **kwargs)


OBJECTIVES = {
    "clip": Objective(clip_objective, ("label_smoothing",)),
    "longclip": Objective(
        longclip_objective,
        ("short_weight", "label_smoothing", "pcm", "pcm_components",
         "pcm_group_size"),
        short_caption=True, pcm=True),
    "fixclip": Objective(
        fixclip_objective,
        ("short_weight", "gta_weights", "gta_first_group", "label_smoothing",
         "pcm", "pcm_components", "pcm_group_size"),
        short_caption=True, masked_image=True, gta=True, pcm=True),
}


def get_objective(name: str) -> Objective:
  """OBJECTIVES[name]; an unknown name is an error listing the known ones."""
  if name not in OBJECTIVES:
    raise ValueError(f"config.objective={name!r}; use one of "
                     f"{' | '.join(sorted(OBJECTIVES))}")
  return OBJECTIVES[name]
