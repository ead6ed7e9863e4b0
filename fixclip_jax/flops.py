"""Analytic FLOPs of one train step and of eval embedding, for any config.

Convention (the one MFU numbers are usually quoted in, e.g. PaLM's appendix B):
  * 2 FLOPs per multiply-add; only matrix products are counted (projections,
    MLPs, the patch-embedding convolution, the attention products QK^T and AV,
    the output projections, the GTA heads and the contrastive logits).
  * Attention is counted dense: the text tower's causal mask and FIX-CLIP's
    regional-prompt mask (docs/method.md §3) do NOT halve or shrink the count, because
    the kernels XLA emits compute the full T x T products and mask afterwards
    (the usual MFU convention). Exception, not counted: on CPU the causal text
    attention runs in query blocks (layers.blocked_causal_attention) and skips
    the blocks above the diagonal, 37.5% of QK^T and AV at T=248, so XLA's own
    count of a text-heavy step comes out a few % below this one.
  * Text runs at the batch's actual lengths when given (`lengths`: a batch cut
    to length buckets, buckets.py), else at the config's contexts.
  * Embedding lookups, LayerNorm, softmax, activations, residual adds, the loss'
    normalisation/cross-entropy and the optimizer update count 0 (they are
    memory-bound elementwise work, a few % of a CLIP step at real sizes).
  * forward + backward = 3 x forward: the backward pass of a matmul is two
    matmuls of the same size (gradient w.r.t. each input). This slightly
    over-counts the patch embedding (no gradient w.r.t. the pixels is needed);
    the convention keeps MFU comparable across codebases.
  * Only what the objective uses is counted, as its spec (losses.OBJECTIVES)
    says: the raw image and long text always; the short text when it reads the
    short caption (longclip, fixclip); the masked image when it reads it
    (fixclip). The masked branch runs at full length with masking.mode="replace" (masked
    patches become the mask token) and at 1 + kept patches with "drop". Every
    vision layer with regional prompts runs on `num_prompts` more tokens.
    GTA heads are counted for the branches whose group features enter the loss
    (raw image and long text) of objectives that read them (fixclip).
  * Rematerialisation (config.remat) is not counted: these are model FLOPs
    (MFU), not hardware FLOPs; XLA's cost analysis does count the recomputed
    forward.
  * Long-CLIP's primary-component matching (PCM, docs/method.md §2) is ignored: its
    SVD works on a [B/S, d] matrix per device (O(B d^2) ~ 0.3 GFLOP at B=256,
    d=512, < 0.01% of a B/16 step) and runs in cuSOLVER/LAPACK, not in matmul
    units, so it would not belong in MFU even if counted.

All numbers are per *global* batch (config.data.global_batch), as Python ints.
"""
from typing import Dict, Optional, Tuple

import ml_collections

from fixclip_jax import losses
from fixclip_jax.models import fixclip
from fixclip_jax.models import sizes

CONVENTION = ("2 FLOPs per multiply-add; matmuls only (incl. attention QK^T "
              "and AV, dense: causal/regional masks not discounted); "
              "embedding lookups, norms, softmax, elementwise and optimizer = 0; "
              "train step = 3 x forward; PCM SVD ignored")


# ----------------------------------------------------------------------------
# Building blocks (forward FLOPs).

def transformer_layer_flops(batch: int, seq: int, width: int, mlp_dim: int) -> int:
  """One pre-LN residual block on [batch, seq, width] tokens.

  qkv 3w*w + out w*w + MLP 2*w*mlp multiply-adds per token, plus QK^T and AV
  (seq * w each per token, summed over heads).
  """
  per_token_macs = 3 * width * width + width * width + 2 * width * mlp_dim
  attention_macs = 2 * seq * seq * width                    # QK^T + AV
  return 2 * batch * (seq * per_token_macs + attention_macs)


def transformer_flops(batch: int, seq: int, width: int, mlp_dim: int,
                      num_layers: int, num_prompts: int = 0,
                      prompt_layers: Optional[tuple] = None) -> int:
  """A stack of blocks; layers with regional prompts see seq + num_prompts."""
  total = 0
  for i in range(num_layers):
    extra = num_prompts if (num_prompts and fixclip.prompt_layer_active(
        i, prompt_layers)) else 0
    total += transformer_layer_flops(batch, seq + extra, width, mlp_dim)
  return total


def vision_tower_flops(cfg: sizes.CLIPConfig, batch: int,
                       num_patches_kept: Optional[int] = None) -> int:
  """Patch embedding + blocks of the vision tower (without the projection).

  num_patches_kept: patches left after token dropping (None = all). The patch
  embedding always runs on all patches (dropping happens after it).
  """
  n = cfg.num_patches
  kept = n if num_patches_kept is None else num_patches_kept
  patch_embed = 2 * batch * n * (cfg.patch_size ** 2 * 3) * cfg.vision_width
  blocks = transformer_flops(batch, 1 + kept, cfg.vision_width, cfg.vision_mlp_dim,
                             cfg.vision_layers, cfg.num_prompts, cfg.prompt_layers)
  return patch_embed + blocks


def text_tower_flops(cfg: sizes.CLIPConfig, batch: int, length: int) -> int:
  """Blocks of the text tower on [batch, length] tokens (lookups are free)."""
  return transformer_flops(batch, length, cfg.text_width, cfg.text_mlp_dim,
                           cfg.text_layers)


def projection_flops(batch: int, width: int, embed_dim: int) -> int:
  """The pooled token's final projection [w] -> [d]."""
  return 2 * batch * width * embed_dim


def gta_head_flops(batch: int, num_layers: int, width: int, groups: int,
                   embed_dim: int) -> int:
  """Gaussian pooling over each group's layers + a Dense w -> d per group."""
  if not groups:
    return 0
  pooling = 2 * batch * num_layers * width           # einsum "gsbw,s->gbw"
  return pooling + groups * 2 * batch * width * embed_dim


def logits_flops(batch: int, embed_dim: int) -> int:
  """One contrastive similarity matrix [B, d] x [d, B]."""
  return 2 * batch * batch * embed_dim


# ----------------------------------------------------------------------------
# Configs -> shapes.

def text_lengths(data: ml_collections.ConfigDict) -> tuple:
  """(long, short) caption lengths of a train batch, as the data pipeline makes
  them from the run config's `data` block (before any length bucket cuts
  them, buckets.py)."""
  long_len = int(data.text_context)
  short_len = int(data.short_context) or long_len
  return long_len, short_len


def batch_text_lengths(batch: dict) -> tuple:
  """(long, short) lengths of an actual (host or global) batch: what the step
  runs on, e.g. after buckets.py cut it. A missing short caption counts 0."""
  short = batch.get("text_short")
  return (int(batch["text_long"].shape[1]),
          int(short.shape[1]) if short is not None else 0)


def kept_patches(masking: ml_collections.ConfigDict, cfg: sizes.CLIPConfig) -> int:
  """Patches the masked branch's transformer sees (fixclip.random_patch_mask);
  masking: the run config's `masking` block."""
  if masking.mode == "replace":
    return cfg.num_patches
  if masking.mode == "drop":
    return cfg.num_patches - int(round(masking.ratio * cfg.num_patches))
  raise ValueError(f"masking.mode={masking.mode!r}; use one of "
                   f"{' | '.join(fixclip.MASKING_MODES)}")


# ----------------------------------------------------------------------------
# Public API.

def train_step_flops(config, batch: Optional[int] = None,
                     lengths: Optional[Tuple[int, int]] = None
                     ) -> Dict[str, int]:
  """Analytic FLOPs of one train step on a global batch, by component.

  Args:
    config: a training config (config_base.base_config() and overrides).
    batch: global batch size; default config.data.global_batch.
    lengths: (long, short) text token lengths the step runs on (a batch cut
      to length buckets, `batch_text_lengths`); default the config's contexts
      (`text_lengths(config.data)`).

  Returns a dict of ints (see the module docstring for the convention):
    vision_raw, vision_masked, text_long, text_short: forward FLOPs of each
      tower pass (0 where the objective does not run it);
    heads: final projections and GTA heads of the branches used (forward);
    logits: contrastive similarity matrices (forward);
    forward: their sum; backward: 2 x forward; total: forward + backward.
  """
  cfg = sizes.model_config(config)
  b = int(config.data.global_batch if batch is None else batch)
  objective = losses.get_objective(config.objective)
  long_len, short_len = (text_lengths(config.data) if lengths is None
                         else (int(n) for n in lengths))
  if max(long_len, short_len) > cfg.context_length:
    raise ValueError(f"text lengths ({long_len}, {short_len}) exceed "
                     f"config.model.context_length={cfg.context_length}")
  d = cfg.embed_dim
  uses_short = objective.short_caption
  uses_masked = objective.masked_image
  parts = {
      "vision_raw": vision_tower_flops(cfg, b),
      "vision_masked": (vision_tower_flops(cfg, b, kept_patches(config.masking, cfg))
                        if uses_masked else 0),
      "text_long": text_tower_flops(cfg, b, long_len),
      "text_short": text_tower_flops(cfg, b, short_len) if uses_short else 0,
  }
  image_passes = 1 + int(uses_masked)
  text_passes = 1 + int(uses_short)
  heads = (image_passes * projection_flops(b, cfg.vision_width, d) +
           text_passes * projection_flops(b, cfg.text_width, d))
  num_logits = 1 + int(uses_short)
  if objective.gta and cfg.gta_groups:
    heads += gta_head_flops(b, cfg.vision_layers, cfg.vision_width,
                            cfg.gta_groups, d)
    heads += gta_head_flops(b, cfg.text_layers, cfg.text_width, cfg.gta_groups, d)
    num_logits += cfg.gta_groups - int(config.loss.gta_first_group) + 1
  parts["heads"] = heads
  parts["logits"] = num_logits * logits_flops(b, d)
  forward = sum(parts.values())
  parts.update(forward=forward, backward=2 * forward, total=3 * forward)
  return parts


def embed_flops(cfg: sizes.CLIPConfig, num_images: int = 0, num_texts: int = 0,
                text_length: Optional[int] = None) -> Dict[str, int]:
  """Forward FLOPs of embedding images and texts for evaluation.

  cfg: the model's CLIPConfig (sizes.model_config(config)); text_length defaults
  to cfg.context_length. Images include the regional prompts (the vision tower
  always runs them); GTA heads are not run for embeddings.
  Returns {"images", "texts", "total"}.
  """
  t = cfg.context_length if text_length is None else int(text_length)
  images = (vision_tower_flops(cfg, num_images) +
            projection_flops(num_images, cfg.vision_width, cfg.embed_dim))
  texts = (text_tower_flops(cfg, num_texts, t) +
           projection_flops(num_texts, cfg.text_width, cfg.embed_dim))
  return {"images": images, "texts": texts, "total": images + texts}


# ----------------------------------------------------------------------------
# Device peaks, for MFU (bench.py and the training metrics).

# bf16 dense peak TFLOP/s per device (vendor data sheets; no sparsity). The
# first substring contained in the lower-cased `device_kind` wins, so the more
# specific names come first ("tpu v5 lite" before "tpu v5").
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),       # SXM; "NVIDIA H100 80GB HBM3"
    ("h200", 989.0),       # same tensor cores as H100 SXM, more/faster memory
    ("a100", 312.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),       # v5p reports "TPU v5"
    ("tpu v6 lite", 918.0),  # v6e (Trillium)
    ("tpu v6e", 918.0),
)


def peak_tflops_for(device_kind: str) -> Optional[float]:
  """bf16 dense peak of one device from PEAK_BF16_TFLOPS, None if unknown."""
  kind = device_kind.lower()
  for name, tflops in PEAK_BF16_TFLOPS:
    if name in kind:
      return tflops
  return None
