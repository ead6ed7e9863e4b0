"""OpenAI CLIP in Flax Linen, with FIX-CLIP's hooks: vision tower, text tower,
and the two-tower model.

Architecture and parameter names follow OpenAI CLIP (docs/method.md §1); the
parameters are a plain pytree, float32, whatever the compute `dtype`. With the
FIX-CLIP fields of `CLIPConfig` at their defaults the model is exactly CLIP;
regional prompts, the mask token and the GTA heads (docs/method.md §3) switch on
from the config.

Each tower returns a dict:
  embedding    [B, d]     projected feature (not normalised), float32
  pooled       [B, w]     CLS (vision) / EOT (text) token after the final LN
  tokens       [B, T, w]  the whole sequence after the final LN
  layer_tokens [L, B, w]  the CLS / EOT token of the residual stream after each
                          block (free when unused: XLA drops dead outputs)
  gta          [G, B, d]  group middle features, when cfg.gta_groups > 0
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fixclip_jax.models import fixclip
from fixclip_jax.models import layers
from fixclip_jax.models.layers import normalize  # re-exported for callers
from fixclip_jax.models.positional import combined_positional_embedding
from fixclip_jax.models.sizes import CLIPConfig

Array = jax.Array
Dtype = Any


# Rematerialisation of each residual block (activations recomputed in the
# backward pass): False/"none" keeps all; True/"full" saves only block inputs;
# "dots" also keeps matmul outputs without batch dims (weights-stationary
# products), trading memory for less recompute.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def remat_block(remat) -> type:
  """ResidualBlock, wrapped in nn.remat with the named policy when asked."""
  if remat in (False, None, "", "none"):
    return layers.ResidualBlock
  name = "full" if remat is True else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}; use none | {' | '.join(REMAT_POLICIES)}")
  # Argument 4 (self, x, mask, bias, is_causal) picks the attention kernel.
  return nn.remat(layers.ResidualBlock, policy=REMAT_POLICIES[name],
                  static_argnums=(4,))


class Transformer(nn.Module):
  """A stack of residual blocks, optionally with FIX-CLIP's regional prompts.

  Returns the final sequence and the token at `pool_index` after every block.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  attn_implementation: Optional[str] = None
  remat: Any = False  # see REMAT_POLICIES
  num_prompts: int = 0
  prompt_layers: Optional[tuple] = None
  prompt_mode: str = "carry"  # fixclip.PROMPT_MODES

  @nn.compact
  def __call__(self, x, *, pool_index=None, is_causal=False, prompt_mask=None):
    """x: [B, T, w]; pool_index: [B]; prompt_mask: bool [B|1, 1, T+M, T+M].

    Returns (x [B, T, w], layer_tokens [L, B, w]).
    """
    b, _, w = x.shape
    rows = jnp.arange(b)
    pool_index = jnp.zeros((b,), jnp.int32) if pool_index is None else pool_index
    block_cls = remat_block(self.remat)
    m = self.num_prompts
    if m and self.prompt_mode not in fixclip.PROMPT_MODES:
      raise ValueError(f"prompt_mode={self.prompt_mode!r}; use "
                       f"{' | '.join(fixclip.PROMPT_MODES)}")
    carried = None                                                   # [B, M, w]
    collected = []
    for i in range(self.num_layers):
      block = block_cls(self.num_heads, self.mlp_dim, self.act, self.dtype,
                        self.attn_implementation, name=f"resblocks_{i}")
      if m and fixclip.prompt_layer_active(i, self.prompt_layers):
        # FIX-CLIP's regional prompts (docs/method.md §3), placed after CLS.
        # "carry": the previous prompted layer's prompt outputs (each gathered
        # from its region's patches) plus this layer's parameters, so CLS reads
        # regional features. "fresh": parameters only; a prompt's keys and values
        # then depend on nothing but its parameters (the ablation's control).
        prompts = self.param(f"prompts_{i}", nn.initializers.normal(0.02), (m, w))
        prompts = jnp.broadcast_to(prompts.astype(x.dtype), (b, m, w))
        if carried is not None and self.prompt_mode == "carry":
          prompts = carried + prompts
        y = jnp.concatenate([x[:, :1], prompts, x[:, 1:]], axis=1)  # [B, T+M, w]
        y = block(y, prompt_mask, None, False)
        carried = y[:, 1:1 + m]                                      # [B, M, w]
        x = jnp.concatenate([y[:, :1], y[:, 1 + m:]], axis=1)       # [B, T, w]
      else:
        x = block(x, None, None, is_causal)
      collected.append(x[rows, pool_index])                          # [B, w]
    return x, jnp.stack(collected)                                   # [L, B, w]


def _tower_outputs(cfg: CLIPConfig, dtype, proj, pooled, tokens, layer_tokens) -> dict:
  """The tower dict of the module docstring; called inside a tower's compact
  __call__, so the GTA heads become that tower's "gta" submodule."""
  emb = pooled @ proj.astype(dtype)                                  # [B, d]
  out = {"embedding": emb.astype(jnp.float32), "pooled": pooled,
         "tokens": tokens, "layer_tokens": layer_tokens}
  if cfg.gta_groups:
    out["gta"] = fixclip.GTAHeads(cfg.gta_groups, cfg.embed_dim, cfg.gta_sigma,
                                  dtype, name="gta")(layer_tokens)
  return out


class VisionTower(nn.Module):
  """ViT as in OpenAI CLIP: conv1 (no bias), CLS, positions, ln_pre, blocks,
  ln_post, proj; plus FIX-CLIP's regional prompts, mask token and GTA heads."""
  cfg: CLIPConfig
  dtype: Dtype = jnp.float32
  attn_implementation: Optional[str] = None
  remat: Any = False  # see REMAT_POLICIES

  @nn.compact
  def __call__(self, images: Array, *, patch_mask: Optional[Array] = None,
               keep_index: Optional[Array] = None) -> dict:
    """images: [B, H, W, 3] normalised pixels.

    patch_mask: optional bool [B, N], True = replace that patch by the mask
      token (FIX-CLIP's masked short branch, docs/method.md §3).
    keep_index: optional int [B, K], keep only these patches (token dropping,
      MAE-style, the cheaper variant).
    """
    c = self.cfg
    w = c.vision_width
    x = nn.Conv(w, (c.patch_size, c.patch_size), strides=c.patch_size,
                padding="VALID", use_bias=False, dtype=self.dtype,
                name="conv1")(images.astype(self.dtype))             # [B, g, g, w]
    b = x.shape[0]
    x = x.reshape(b, -1, w)                                          # [B, N, w]
    scale = w ** -0.5
    cls = self.param("class_embedding", nn.initializers.normal(scale), (w,))
    pos = self.param("positional_embedding", nn.initializers.normal(scale),
                     (c.num_patches + 1, w)).astype(self.dtype)
    if x.shape[1] + 1 != pos.shape[0]:
      raise ValueError(f"Image of {images.shape[1:3]} gives {x.shape[1]} patches; "
                       f"the model was built for {c.image_size}px ({c.num_patches}).")
    if c.mask_token:
      token = self.param("mask_token", nn.initializers.zeros, (w,))
      if patch_mask is not None:
        # Masked patches lose their content but keep their position (added below).
        x = jnp.where(patch_mask[..., None], token.astype(self.dtype), x)
    elif patch_mask is not None:
      raise ValueError("patch_mask given but the config has no mask_token")
    x = x + pos[1:]
    regions = jnp.asarray(fixclip.patch_regions(
        c.grid_size, max(c.num_prompts, 1), c.region_layout))[None]  # [1, N]
    if keep_index is not None:
      x = jnp.take_along_axis(x, keep_index[..., None], axis=1)      # [B, K, w]
      regions = jnp.take_along_axis(jnp.broadcast_to(regions, (b, c.num_patches)),
                                    keep_index, axis=1)               # [B, K]
    cls = jnp.broadcast_to((cls.astype(self.dtype) + pos[0]), (b, 1, w))
    x = jnp.concatenate([cls, x], axis=1)                            # [B, 1+N, w]
    x = layers.LayerNorm(self.dtype, name="ln_pre")(x)
    prompt_mask = None
    if c.num_prompts:
      prompt_mask = fixclip.regional_prompt_mask(regions, c.num_prompts)[:, None]
    x, layer_tokens = Transformer(
        c.vision_layers, c.vision_heads, c.vision_mlp_dim, c.act, self.dtype,
        self.attn_implementation, self.remat, c.num_prompts, c.prompt_layers,
        c.prompt_mode, name="transformer")(x, prompt_mask=prompt_mask)
    x = layers.LayerNorm(self.dtype, name="ln_post")(x)
    pooled = x[:, 0]                                                 # [B, w]
    proj = self.param("proj", nn.initializers.normal(scale), (w, c.embed_dim))
    return _tower_outputs(c, self.dtype, proj, pooled, x, layer_tokens)


class TextTower(nn.Module):
  """Causal text transformer pooled at the EOT token: the largest id (CLIP's
  BPE), or the first cfg.eot_token_id (e.g. a SentencePiece eos)."""
  cfg: CLIPConfig
  dtype: Dtype = jnp.float32
  attn_implementation: Optional[str] = None
  remat: Any = False  # see REMAT_POLICIES

  @nn.compact
  def __call__(self, text: Array) -> dict:
    """text: [B, T] int token ids, T <= context_length, padded with 0."""
    c = self.cfg
    w = c.text_width
    b, t = text.shape
    if t > c.context_length:
      raise ValueError(f"Text of {t} tokens exceeds context_length {c.context_length}")
    tok = self.param("token_embedding", nn.initializers.normal(0.02),
                     (c.vocab_size, w))
    # Only the first T rows: a batch cut to a length bucket (buckets.py) gets
    # the same positions as at full context, and no gradient reaches the rest.
    pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                     (c.context_length, w))[:t]                      # [T, w]
    if c.positional_keep is not None:
      # Long-CLIP (docs/method.md §2): rows < keep from the frozen table, rows >= keep
      # from the trainable residual table.
      pos_res = self.param("positional_embedding_res",
                           nn.initializers.normal(0.01), (c.context_length, w))
      pos = combined_positional_embedding(pos, pos_res[:t], c.positional_keep)
    x = (jnp.take(tok, text, axis=0) + pos).astype(self.dtype)       # [B, T, w]
    if c.eot_token_id is None:
      eot = jnp.argmax(text, axis=-1)                                # [B]
    else:
      eot = jnp.argmax(text == c.eot_token_id, axis=-1)              # [B]
    x, layer_tokens = Transformer(
        c.text_layers, c.text_heads, c.text_mlp_dim, c.act, self.dtype,
        self.attn_implementation, self.remat, name="transformer")(
            x, pool_index=eot, is_causal=True)
    x = layers.LayerNorm(self.dtype, name="ln_final")(x)
    pooled = x[jnp.arange(b), eot]                                   # [B, w]
    proj = self.param("text_projection", nn.initializers.normal(w ** -0.5),
                      (w, c.embed_dim))
    return _tower_outputs(c, self.dtype, proj, pooled, x, layer_tokens)


class CLIP(nn.Module):
  """Two towers and a learnable temperature; params {visual, text, logit_scale}."""
  cfg: CLIPConfig
  dtype: Dtype = jnp.float32
  attn_implementation: Optional[str] = None
  remat: Any = False  # see REMAT_POLICIES

  def setup(self):
    kw = dict(cfg=self.cfg, dtype=self.dtype,
              attn_implementation=self.attn_implementation, remat=self.remat)
    self.visual = VisionTower(**kw)
    self.text = TextTower(**kw)
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(np.log(1 / 0.07)), ())

  def encode_image(self, images, patch_mask=None, keep_index=None):
    return self.visual(images, patch_mask=patch_mask, keep_index=keep_index)

  def encode_text(self, text):
    return self.text(text)

  def __call__(self, images, text):
    """Returns {"image": tower dict, "text": tower dict, "logit_scale": ()}."""
    return {"image": self.visual(images), "text": self.text(text),
            "logit_scale": self.logit_scale}

  def train_outputs(self, images, text_long, text_short=None, patch_mask=None,
                    keep_index=None):
    """Every branch an objective may use, in one apply (losses.py's input).

    "image": raw images; "image_masked": the masked short branch when a
    patch_mask or keep_index is given; "text_long" / "text_short": the two
    captions (one text-tower pass when both have the same length; no short
    branch when text_short is None).
    """
    out = {"image": self.visual(images), "logit_scale": self.logit_scale}
    if patch_mask is not None or keep_index is not None:
      out["image_masked"] = self.visual(images, patch_mask=patch_mask,
                                        keep_index=keep_index)
    if text_short is None:  # objectives without a short branch (clip)
      out["text_long"] = self.text(text_long)
    elif text_long.shape[1] == text_short.shape[1]:
      both = self.text(jnp.concatenate([text_long, text_short], axis=0))
      out["text_long"], out["text_short"] = _split_tower_batch(both, text_long.shape[0])
    else:
      out["text_long"], out["text_short"] = self.text(text_long), self.text(text_short)
    return out


# Tower outputs stacked per layer / group carry the batch on axis 1.
_BATCH_AXIS = {"layer_tokens": 1, "gta": 1}


def _split_tower_batch(out: dict, n: int) -> tuple:
  """Splits a tower dict computed on a concatenated batch into [:n] and [n:]."""
  first = {k: jax.lax.slice_in_dim(v, 0, n, axis=_BATCH_AXIS.get(k, 0))
           for k, v in out.items()}
  second = {k: jax.lax.slice_in_dim(v, n, 2 * n, axis=_BATCH_AXIS.get(k, 0))
            for k, v in out.items()}
  return first, second


def init_params(cfg: CLIPConfig, rng: Optional[Array] = None) -> dict:
  """Random float32 parameters for `CLIP(cfg)` (a plain nested dict)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  model = CLIP(cfg)
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  text = jnp.zeros((1, cfg.context_length), jnp.int32)
  return jax.jit(model.init)(rng, images, text)["params"]
