"""Transformer building blocks shared by both CLIP towers.

Attention goes through ONE function, `attention`, so that the text tower's
causal mask and FIX-CLIP's regional-prompt mask (docs/method.md §3) plug into the
same place. Parameter names follow OpenAI CLIP (docs/method.md §1) so that checkpoint
conversion is a table of renames and transposes.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# PyTorch's nn.LayerNorm default; Flax's default (1e-6) would break parity.
LAYER_NORM_EPS = 1e-5


def quick_gelu(x: Array) -> Array:
  """OpenAI CLIP's activation: x * sigmoid(1.702 x) (docs/method.md §1)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: nn.gelu(x, approximate=False),  # torch.nn.GELU()
}


def normalize(x: Array, eps: float = 1e-12) -> Array:
  """L2-normalises the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps * eps))


# Causal attention on CPU runs in blocks of this many queries
# (blocked_causal_attention).
CAUSAL_BLOCK = 64


def attention(q: Array, k: Array, v: Array, *,
              mask: Optional[Array] = None,
              bias: Optional[Array] = None,
              is_causal: bool = False,
              implementation: Optional[str] = None) -> Array:
  """Multi-head scaled dot-product attention, the single place all masks meet.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, N, H] keys.
    v: [B, S, N, H] values.
    mask: optional boolean mask broadcastable to [B, N, T, S]; True = attend.
    bias: optional additive bias broadcastable to [B, N, T, S] (0 or -inf).
    is_causal: apply a causal mask (lets cuDNN use its fused causal kernel).
    implementation: None (XLA picks; on CPU, causal attention without other
      masks runs blockwise, `blocked_causal_attention`), "xla" (always
      `jax.nn.dot_product_attention`'s XLA path) or "cudnn".

  Returns:
    [B, T, N, H] attention output, in q's dtype.
  """
  if (is_causal and mask is None and bias is None and implementation is None
      and jax.default_backend() == "cpu"):
    return blocked_causal_attention(q, k, v)
  if bias is not None:
    bias = bias.astype(q.dtype)
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask, is_causal=is_causal,
      implementation=implementation)


def blocked_causal_attention(q: Array, k: Array, v: Array,
                             block: int = CAUSAL_BLOCK) -> Array:
  """Causal self-attention, queries in blocks: block [i, j) attends to keys
  [0, j) only, so the products above the diagonal's blocks are never formed.

  Per block, the operations of jax.nn.dot_product_attention's XLA path (float32
  logits, scale, masked with the same large negative, float32 softmax): the
  keys it leaves out would get softmax weight exactly 0 there, so the result
  is the same up to float rounding. Why: XLA's CPU code materialises several
  [B, N, T, T] float32 arrays per layer, memory-bound work; blocks skip
  ~40% of them at T=248 and keep the rest smaller. Measured on a 2-core CPU,
  B=128, T=224, 2 heads of 64: forward + backward 1.75x faster (974 vs 1703
  ms), temps 186 vs 210 MiB (BENCHMARKS.md).

  q, k, v: [B, T, N, H] (self-attention: T queries, T keys). Returns [B, T, N, H].
  """
  t = q.shape[1]
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  scale = jnp.asarray(q.shape[-1] ** -0.5, logits_dtype)
  large_negative = jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max, logits_dtype)
  out = []
  for start in range(0, t, block):
    stop = min(start + block, t)
    logits = jnp.einsum("btnh,bsnh->bnts", q[:, start:stop], k[:, :stop],
                        preferred_element_type=logits_dtype) * scale  # [B, N, b, s]
    causal = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]
    logits = jnp.where(causal, logits, large_negative)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
    out.append(jnp.einsum("bnts,bsnh->btnh", probs, v[:, :stop]))   # [B, b, N, H]
  return jnp.concatenate(out, axis=1).astype(q.dtype)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 whatever the compute dtype (as OpenAI's).

  Params `scale` [w] and `bias` [w], float32.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (w,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (w,), jnp.float32)
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS) * scale + bias
    return y.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Self-attention with OpenAI's fused q/k/v projection (`in_proj`)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  attn_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, mask=None, bias=None, is_causal=False) -> Array:
    b, t, w = x.shape
    assert w % self.num_heads == 0, (w, self.num_heads)
    qkv = nn.Dense(3 * w, dtype=self.dtype, name="in_proj")(x)   # [B, T, 3w]
    q, k, v = jnp.split(qkv, 3, axis=-1)                          # 3x [B, T, w]
    heads = lambda y: y.reshape(b, t, self.num_heads, w // self.num_heads)
    y = attention(heads(q), heads(k), heads(v), mask=mask, bias=bias,
                  is_causal=is_causal, implementation=self.attn_implementation)
    y = y.reshape(b, t, w)                                        # [B, T, w]
    return nn.Dense(w, dtype=self.dtype, name="out_proj")(y)


class Mlp(nn.Module):
  """c_fc -> activation -> c_proj."""
  mlp_dim: int
  act: str = "quick_gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = x.shape[-1]
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="c_fc")(x)  # [B, T, 4w]
    h = ACTIVATIONS[self.act](h)
    return nn.Dense(w, dtype=self.dtype, name="c_proj")(h)        # [B, T, w]


class ResidualBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""
  num_heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  attn_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, mask=None, bias=None, is_causal=False) -> Array:
    y = LayerNorm(self.dtype, name="ln_1")(x)
    x = x + MultiHeadAttention(self.num_heads, self.dtype,
                               self.attn_implementation, name="attn")(
                                   y, mask=mask, bias=bias, is_causal=is_causal)
    y = LayerNorm(self.dtype, name="ln_2")(x)
    x = x + Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(y)
    return x
