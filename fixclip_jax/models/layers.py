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
import numpy as np

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


def normalize(x: Any, eps: float = 1e-12, xp: Any = jnp) -> Any:
  """L2-normalises the last axis, in float32: the package's one L2 normaliser.

  xp: the array module: jax.numpy (the towers, the losses) or numpy (features
  on the host: evaluation, the Python API), as pixels.normalize_uint8.
  """
  x = xp.asarray(x, xp.float32)
  squares = xp.maximum(xp.sum(x * x, -1, keepdims=True), eps * eps)
  return x * (jax.lax.rsqrt(squares) if xp is jnp else 1 / np.sqrt(squares))


# Causal attention on CPU runs in blocks of this many queries (cpu_attention).
CAUSAL_BLOCK = 64
# `attention`'s implementation names besides None (XLA picks).
ATTN_IMPLEMENTATIONS = ("xla", "cudnn")


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
    implementation: None (XLA picks; on CPU, `cpu_attention`: heads-major,
      causal attention in query blocks), "xla" (always
      `jax.nn.dot_product_attention`'s XLA path) or "cudnn".

  Returns:
    [B, T, N, H] attention output, in q's dtype.
  """
  if implementation is None and jax.default_backend() == "cpu":
    return cpu_attention(q, k, v, mask=mask, bias=bias, is_causal=is_causal)
  if bias is not None:
    bias = bias.astype(q.dtype)
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask, is_causal=is_causal,
      implementation=implementation)


def _block(x: Optional[Array], rows: slice, cols: slice) -> Optional[Array]:
  """x broadcastable to [B, N, T, S], cut to the query rows / key columns of
  a block (axes of size 1 stay broadcast)."""
  if x is None:
    return None
  x = jnp.asarray(x)
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  return x[:, :, rows if x.shape[2] > 1 else slice(None),
           cols if x.shape[3] > 1 else slice(None)]


def cpu_attention(q: Array, k: Array, v: Array, *,
                  mask: Optional[Array] = None,
                  bias: Optional[Array] = None,
                  is_causal: bool = False,
                  block: int = CAUSAL_BLOCK) -> Array:
  """`attention` on CPU: the operations of jax.nn.dot_product_attention's XLA
  path (float32 logits, scale, bias, masks with the same large negative,
  float32 softmax), arranged for XLA's CPU code. The result is the same up to
  float rounding (bit-identical scale: see below).

  - Heads-major: q, k, v are transposed once to [B, N, T, H] and the output
    once back. The XLA path contracts [B, T, N, H] operands directly and XLA's
    CPU code then copies every operand (for causal blocks: every key / value
    prefix) into a heads-major layout before each product.
  - The scale is folded into q ([B, T, N, H]) instead of the logits
    ([B, N, T, S]) when it is a power of two (head width 4^k, e.g. CLIP's 64):
    multiplying by 2^-k is exact, so the logits are the same bits.
  - Causal self-attention runs in blocks of `block` queries: block [i, j)
    attends to keys [0, j) only, so the products above the diagonal's blocks
    are never formed (the keys it leaves out would get softmax weight exactly
    0). XLA's CPU code materialises several [B, N, T, S] float32 arrays per
    layer, memory-bound work; blocks skip 37.5% of them at T=248.

  Measured on the shared 2-core CPU of BENCHMARKS.md, B=128, 2 heads of 64,
  forward + backward from the fused q/k/v output, medians of 7 interleaved
  calls, vs the previous version (causal: query blocks on [B, T, N, H];
  otherwise the XLA path): vision 65 tokens 41.6 -> 19.9 ms, 69 tokens with
  FIX-CLIP's regional-prompt mask 34.4 -> 22.1 ms; causal 160 tokens
  162 -> 144 ms (a second run: 98.3 -> 98.8), 224 tokens 186 -> 169 ms, 248
  tokens 345 -> 312 ms. PyTorch's fused CPU kernel
  (scaled_dot_product_attention, causal) took 82 ms at 160 and 190 ms at 248
  tokens in the same loop: the causal forward is where XLA's CPU code still
  loses (it writes the [B, N, T, S] logits and probabilities to memory).

  q: [B, T, N, H]; k, v: [B, S, N, H]; mask, bias: broadcastable to
  [B, N, T, S]. Returns [B, T, N, H] in q's dtype.
  """
  t, s, h = q.shape[1], k.shape[1], q.shape[-1]
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  scale = h ** -0.5
  exact_scale = float(np.log2(scale)).is_integer()
  large_negative = jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max, logits_dtype)
  if exact_scale:
    q = q * jnp.asarray(scale, q.dtype)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))           # [B, N, T, H]
  blocked = is_causal and t == s
  out = []
  for start in range(0, t, block if blocked else t):
    stop = min(start + block, t) if blocked else t
    keys = stop if blocked else s
    rows, cols = slice(start, stop), slice(0, keys)
    logits = jnp.einsum("bnth,bnsh->bnts", q[:, :, rows], k[:, :, cols],
                        preferred_element_type=logits_dtype)        # [B, N, b, s]
    if not exact_scale:
      logits = logits * jnp.asarray(scale, logits_dtype)
    if bias is not None:
      logits = (logits + _block(bias, rows, cols)).astype(logits_dtype)
    keep = _block(mask, rows, cols)
    if is_causal:
      causal = jnp.arange(start, stop)[:, None] >= jnp.arange(keys)[None, :]
      keep = causal if keep is None else keep & causal
    if keep is not None:
      logits = jnp.where(keep, logits, large_negative)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
    out.append(jnp.einsum("bnts,bnsh->bnth", probs, v[:, :, cols]))  # [B, N, b, H]
  out = out[0] if len(out) == 1 else jnp.concatenate(out, axis=2)
  return out.transpose(0, 2, 1, 3).astype(q.dtype)                  # [B, T, N, H]


def blocked_causal_attention(q: Array, k: Array, v: Array,
                             block: int = CAUSAL_BLOCK) -> Array:
  """Causal self-attention in query blocks (`cpu_attention` with is_causal)."""
  return cpu_attention(q, k, v, is_causal=True, block=block)


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
