"""OpenAI CLIP in Flax Linen: vision tower, text tower and the two-tower model.

Architecture and parameter names follow OpenAI CLIP (method.md §1); the
parameters are a plain pytree, float32, whatever the compute `dtype`.

Each tower returns a dict:
  embedding    [B, d]     projected feature (not normalised)
  pooled       [B, w]     CLS (vision) / EOT (text) token after the final LN
  tokens       [B, T, w]  the whole sequence after the final LN
  layer_tokens [L, B, w]  the CLS / EOT token of the residual stream after each
                          block, for FIX-CLIP's hierarchical alignment (§3);
                          free when unused (XLA drops dead outputs).
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fixclip_jax.models import layers
from fixclip_jax.models.layers import normalize  # re-exported for callers
from fixclip_jax.positional import combined_positional_embedding
from fixclip_jax.models.sizes import CLIPConfig

Array = jax.Array
Dtype = Any


def _blocks(n, heads, mlp_dim, act, dtype, attn_impl, remat, prefix="resblocks"):
  cls = nn.remat(layers.ResidualBlock) if remat else layers.ResidualBlock
  return [cls(heads, mlp_dim, act, dtype, attn_impl, name=f"{prefix}_{i}")
          for i in range(n)]


class Transformer(nn.Module):
  """A stack of residual blocks; also returns one token per layer."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  attn_implementation: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, pool_index=None, mask=None, is_causal=False):
    """x: [B, T, w]; pool_index: [B] position of the token to collect per layer.

    Returns (x [B, T, w], layer_tokens [L, B, w]).
    """
    pool_index = (jnp.zeros((x.shape[0],), jnp.int32)
                  if pool_index is None else pool_index)
    rows = jnp.arange(x.shape[0])
    collected = []
    for block in _blocks(self.num_layers, self.num_heads, self.mlp_dim,
                         self.act, self.dtype, self.attn_implementation,
                         self.remat):
      x = block(x, mask, None, is_causal)
      collected.append(x[rows, pool_index])                       # [B, w]
    return x, jnp.stack(collected)                                 # [L, B, w]


class VisionTower(nn.Module):
  """ViT as in OpenAI CLIP: conv1 (no bias), CLS, positions, ln_pre, blocks, ln_post, proj."""
  cfg: CLIPConfig
  dtype: Dtype = jnp.float32
  attn_implementation: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, images: Array) -> dict:
    """images: [B, H, W, 3] normalised float pixels."""
    c = self.cfg
    w = c.vision_width
    x = nn.Conv(w, (c.patch_size, c.patch_size), strides=c.patch_size,
                padding="VALID", use_bias=False, dtype=self.dtype,
                name="conv1")(images.astype(self.dtype))            # [B, g, g, w]
    b = x.shape[0]
    x = x.reshape(b, -1, w)                                         # [B, N, w]
    scale = w ** -0.5
    cls = self.param("class_embedding", nn.initializers.normal(scale), (w,))
    pos = self.param("positional_embedding", nn.initializers.normal(scale),
                     (c.num_patches + 1, w))
    if x.shape[1] + 1 != pos.shape[0]:
      raise ValueError(f"Image of {images.shape[1:3]} gives {x.shape[1]} patches; "
                       f"the model was built for {c.image_size}px ({c.num_patches}).")
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, w)), x],
                        axis=1)                                     # [B, 1+N, w]
    x = x + pos.astype(self.dtype)
    x = layers.LayerNorm(self.dtype, name="ln_pre")(x)
    x, layer_tokens = Transformer(
        c.vision_layers, c.vision_heads, c.vision_mlp_dim, c.act, self.dtype,
        self.attn_implementation, self.remat, name="transformer")(x)
    x = layers.LayerNorm(self.dtype, name="ln_post")(x)
    pooled = x[:, 0]                                                # [B, w]
    proj = self.param("proj", nn.initializers.normal(scale), (w, c.embed_dim))
    emb = pooled @ proj.astype(self.dtype)                          # [B, d]
    return {"embedding": emb.astype(jnp.float32), "pooled": pooled,
            "tokens": x, "layer_tokens": layer_tokens}


class TextTower(nn.Module):
  """Causal text transformer pooled at the EOT token (the largest id)."""
  cfg: CLIPConfig
  dtype: Dtype = jnp.float32
  attn_implementation: Optional[str] = None
  remat: bool = False

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
    pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                     (c.context_length, w))
    if c.positional_keep is not None:
      # Long-CLIP (method.md §2): rows < keep from the frozen table, rows >= keep
      # from the trainable residual table.
      pos_res = self.param("positional_embedding_res",
                           nn.initializers.normal(0.01), (c.context_length, w))
      pos = combined_positional_embedding(pos, pos_res, c.positional_keep)
    x = (jnp.take(tok, text, axis=0) + pos[:t]).astype(self.dtype)  # [B, T, w]
    eot = jnp.argmax(text, axis=-1)                                 # [B]
    x, layer_tokens = Transformer(
        c.text_layers, c.text_heads, c.text_mlp_dim, c.act, self.dtype,
        self.attn_implementation, self.remat, name="transformer")(
            x, pool_index=eot, is_causal=True)
    x = layers.LayerNorm(self.dtype, name="ln_final")(x)
    pooled = x[jnp.arange(b), eot]                                  # [B, w]
    proj = self.param("text_projection", nn.initializers.normal(w ** -0.5),
                      (w, c.embed_dim))
    emb = pooled @ proj.astype(self.dtype)                          # [B, d]
    return {"embedding": emb.astype(jnp.float32), "pooled": pooled,
            "tokens": x, "layer_tokens": layer_tokens}


class CLIP(nn.Module):
  """Two towers and a learnable temperature; params {visual, text, logit_scale}."""
  cfg: CLIPConfig
  dtype: Dtype = jnp.float32
  attn_implementation: Optional[str] = None
  remat: bool = False

  def setup(self):
    kw = dict(cfg=self.cfg, dtype=self.dtype,
              attn_implementation=self.attn_implementation, remat=self.remat)
    self.visual = VisionTower(**kw)
    self.text = TextTower(**kw)
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(np.log(1 / 0.07)), ())

  def encode_image(self, images):
    return self.visual(images)

  def encode_text(self, text):
    return self.text(text)

  def __call__(self, images, text):
    """Returns {"image": tower dict, "text": tower dict, "logit_scale": ()}."""
    return {"image": self.visual(images), "text": self.text(text),
            "logit_scale": self.logit_scale}


def init_params(cfg: CLIPConfig, rng: Optional[Array] = None) -> dict:
  """Random float32 parameters for `CLIP(cfg)` (a plain nested dict)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  model = CLIP(cfg)
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  text = jnp.zeros((1, cfg.context_length), jnp.int32)
  return jax.jit(model.init)(rng, images, text)["params"]
