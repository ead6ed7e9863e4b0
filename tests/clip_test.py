"""Model options: remat policies, bf16 compute, sizes, shape errors."""
from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from fixclip_jax import losses
from fixclip_jax.models import clip
from fixclip_jax.models import fixclip
from fixclip_jax.models import layers
from fixclip_jax.models import sizes


def _batch(cfg, b=4, seed=0):
  rng = np.random.default_rng(seed)
  text = np.zeros((b, cfg.context_length), np.int32)
  text[:, 0] = 49406
  text[:, 1:30] = rng.integers(1, 49000, size=(b, 29))
  text[:, 30] = 49407
  images = rng.normal(size=(b, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  return jnp.asarray(images), jnp.asarray(text)


def _fixclip_loss(model, params, images, text):
  masked, _ = fixclip.random_patch_mask(jax.random.PRNGKey(0), images.shape[0],
                                        model.cfg.num_patches, 0.75)
  out = model.apply({"params": params}, images, text, text, patch_mask=masked,
                    method=clip.CLIP.train_outputs)
  return losses.fixclip_objective(out, gta_weights=(0.5,), gta_first_group=2)[0]


class CLIPOptionsTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cfg = sizes.get_config("tiny", context_length=248, positional_keep=20,
                               num_prompts=4, mask_token=True, gta_groups=2)
    cls.params = clip.init_params(cls.cfg, jax.random.PRNGKey(1))
    cls.images, cls.text = _batch(cls.cfg)

  def test_remat_same_gradients(self):
    grad = lambda m: jax.jit(jax.grad(
        lambda p: _fixclip_loss(m, p, self.images, self.text)))(self.params)
    want = grad(clip.CLIP(self.cfg))
    for policy in ("full", "dots"):
      got = grad(clip.CLIP(self.cfg, remat=policy))
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                   got, want)

  def test_remat_is_in_the_train_step(self):
    """config.remat reaches the model step.make_model builds: one
    rematerialised (optimisation-barrier) region per residual block."""
    from fixclip_jax import config_base  # pylint: disable=g-import-not-at-top
    from fixclip_jax import step as step_lib  # pylint: disable=g-import-not-at-top
    config = config_base.base_config()
    layers_total = self.cfg.vision_layers + self.cfg.text_layers
    for remat, barriers in (("none", 0), ("full", layers_total),
                            ("dots", layers_total)):
      config.remat = remat
      model = step_lib.make_model(config, self.cfg)
      self.assertEqual(model.remat, remat)
      hlo = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(
          {"params": p}, self.images, self.text)["text"]["embedding"]) + jnp.sum(
              model.apply({"params": p}, self.images, self.text)["image"]["embedding"])
      )).lower(self.params).as_text()
      self.assertEqual(hlo.count("stablehlo.optimization_barrier"), barriers, remat)

  def test_unknown_remat_policy(self):
    with self.assertRaisesRegex(ValueError, "remat='some'"):
      clip.remat_block("some")

  def test_bfloat16_loss_close_to_float32(self):
    f32 = _fixclip_loss(clip.CLIP(self.cfg), self.params, self.images, self.text)
    bf16 = _fixclip_loss(clip.CLIP(self.cfg, dtype=jnp.bfloat16), self.params,
                         self.images, self.text)
    rel = abs(float(bf16) - float(f32)) / abs(float(f32))
    print(f"FIX-CLIP loss bf16 vs f32: {float(bf16):.5f} vs {float(f32):.5f} (rel {rel:.2e})")
    self.assertLess(rel, 1e-2)

  def test_pooling_at_a_configured_eot_id(self):
    # A SentencePiece-style vocabulary: eos = 2, a small id, so argmax would
    # pool at the largest ordinary token instead.
    base = sizes.get_config("tiny")
    cfg = base.replace(eot_token_id=2)
    params = clip.init_params(base)
    text = np.zeros((2, 77), np.int32)
    text[0, :6] = [1, 900, 40000, 7, 2, 0]
    text[1, :4] = [1, 30000, 5, 2]
    out = clip.CLIP(cfg).apply({"params": params}, jnp.asarray(text),
                               method=clip.CLIP.encode_text)
    np.testing.assert_array_equal(out["pooled"], out["tokens"][jnp.arange(2), jnp.array([4, 3])])
    argmax = clip.CLIP(base).apply({"params": params}, jnp.asarray(text),
                                   method=clip.CLIP.encode_text)
    self.assertFalse(np.allclose(argmax["pooled"], out["pooled"]))

  def test_named_sizes(self):
    b16 = sizes.get_config("B/16")
    self.assertEqual((b16.vision_width, b16.vision_layers, b16.vision_heads,
                      b16.embed_dim, b16.num_patches), (768, 12, 12, 512, 196))
    l14 = sizes.get_config("L/14@336", context_length=248)
    self.assertEqual((l14.vision_width, l14.image_size, l14.text_width,
                      l14.context_length), (1024, 336, 768, 248))
    with self.assertRaisesRegex(ValueError, "Unknown model size 'Q/7'"):
      sizes.get_config("Q/7")

  def test_shape_errors_name_the_problem(self):
    model = clip.CLIP(self.cfg)
    with self.assertRaisesRegex(ValueError, "exceeds context_length 248"):
      model.apply({"params": self.params}, jnp.zeros((1, 300), jnp.int32),
                  method=clip.CLIP.encode_text)
    with self.assertRaisesRegex(ValueError, "built for 32px"):
      model.apply({"params": self.params}, jnp.zeros((1, 64, 64, 3)),
                  method=clip.CLIP.encode_image)


class BlockedCausalAttentionTest(parameterized.TestCase):
  """The CPU text path: causal attention in query blocks = the dense one."""

  @parameterized.parameters((5,), (64,), (77,), (200,), (248,))
  def test_same_output_and_gradients_as_dense(self, length):
    rng = np.random.default_rng(length)
    q, k, v = (jnp.asarray(rng.standard_normal((3, length, 2, 64)), jnp.float32)
               for _ in range(3))
    dense = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="xla")
    for fn in (dense, layers.blocked_causal_attention):
      self.assertEqual(fn(q, k, v).shape, (3, length, 2, 64))
    np.testing.assert_allclose(layers.blocked_causal_attention(q, k, v),
                               dense(q, k, v), rtol=1e-5, atol=5e-6)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
    got = jax.grad(loss(layers.blocked_causal_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)

  def test_future_keys_do_not_matter(self):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 100, 2, 8)), jnp.float32)
               for _ in range(3))
    changed = v.at[:, 70:].set(1e3)              # only rows >= 70 may see it
    a = layers.blocked_causal_attention(q, k, v)
    b = layers.blocked_causal_attention(q, k, changed)
    np.testing.assert_array_equal(a[:, :70], b[:, :70])
    self.assertFalse(np.allclose(a[:, 70:], b[:, 70:]))

  def test_dispatch(self):
    """CPU -> cpu_attention (causal: query blocks); "xla" -> the XLA path."""
    q = jnp.zeros((1, 130, 1, 8))
    hlo = lambda **kw: jax.jit(lambda x: layers.attention(x, x, x, **kw)).lower(
        q).as_text()
    self.assertEqual(jax.default_backend(), "cpu")
    # Blocks of 64 queries against 64, 128 and 130 keys.
    self.assertIn("1x1x64x128", hlo(is_causal=True))
    self.assertNotIn("1x1x64x128", hlo(is_causal=True, implementation="xla"))
    # Other masks: one block, all keys.
    self.assertNotIn("1x1x64x128", hlo(mask=jnp.ones((130, 130), bool)))
    self.assertIn("1x1x130x130", hlo(mask=jnp.ones((130, 130), bool)))


class CPUAttentionTest(parameterized.TestCase):
  """cpu_attention (heads-major, scale folded when exact, causal blocks) =
  jax.nn.dot_product_attention's XLA path, outputs and gradients, for every
  mask the models use."""

  @parameterized.named_parameters(
      ("vision_no_mask", 65, 65, 64, False, None, False),
      ("regional_prompt_mask", 69, 69, 64, False, "mask", False),
      ("mask_per_example_and_head", 40, 40, 64, False, "mask4d", False),
      ("bias", 33, 33, 64, False, "bias", False),
      ("causal_and_mask", 150, 150, 64, True, "mask", False),
      ("head_width_32_inexact_scale", 70, 70, 32, True, None, False),
      ("cross_attention", 20, 37, 64, False, "mask", False),
      ("causal_cross_lengths", 20, 37, 64, True, None, False),
      ("bfloat16", 65, 65, 64, True, None, True),
  )
  def test_same_as_xla_path(self, t, s, h, is_causal, extra, bf16):
    rng = np.random.default_rng(t * s + h)
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    q = jnp.asarray(rng.standard_normal((3, t, 2, h)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((3, s, 2, h)), dtype) for _ in range(2))
    kw = {"is_causal": is_causal}
    if extra == "mask":       # [B, 1, T, S], every query keeps a key
      kw["mask"] = jnp.asarray(rng.random((3, 1, t, s)) > 0.3).at[..., 0].set(True)
    elif extra == "mask4d":   # [B, N, T, S] with fully masked rows
      kw["mask"] = jnp.asarray(rng.random((3, 2, t, s)) > 0.5).at[:, :, :3].set(False)
    elif extra == "bias":     # [T, S] broadcast, 0 / -inf
      kw["bias"] = jnp.where(jnp.asarray(rng.random((t, s)) > 0.3).at[:, 0].set(True),
                             0.0, -jnp.inf).astype(dtype)
    xla = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="xla", **{
            **kw, "bias": None if "bias" not in kw else kw["bias"].astype(dtype)})
    ours = lambda q, k, v: layers.cpu_attention(q, k, v, **kw)
    got, want = ours(q, k, v), xla(q, k, v)
    self.assertEqual(got.shape, (3, t, 2, h))
    self.assertEqual(got.dtype, dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=5e-6)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               **tol)
    if bf16:
      return
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
    got = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)

  def test_scale_is_folded_only_when_exact(self):
    """Head width 64: q * 2^-3 before the product (the logits' bits are the
    same); width 32: the logits are scaled, as the XLA path does."""
    def scaled_shapes(h):
      x = jnp.zeros((1, 8, 1, h))
      jaxpr = jax.make_jaxpr(lambda x: layers.cpu_attention(x, x, x))(x)
      return [e.outvars[0].aval.shape for e in jaxpr.eqns
              if e.primitive.name == "mul"]
    self.assertEqual(scaled_shapes(64), [(1, 8, 1, 64)])   # q
    self.assertEqual(scaled_shapes(32), [(1, 1, 8, 8)])    # logits [B, N, T, S]


if __name__ == "__main__":
  absltest.main()
