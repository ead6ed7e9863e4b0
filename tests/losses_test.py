"""Tests for the contrastive objectives against PyTorch / open_clip references."""
from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from fixclip_jax import losses


def _features(b, d, seed):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(b, d)).astype(np.float32)


def _unit(b, d, seed):
  """Random L2-normalised rows: infonce takes prepared features."""
  x = _features(b, d, seed)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _infonce_float64(img, txt, scale, smoothing):
  """Symmetric label-smoothed InfoNCE in float64 numpy, from its definition."""
  img = img / np.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T
  n = len(logits)
  target = (1 - smoothing) * np.eye(n) + smoothing / n
  def ce(z):
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(target * logp).sum(-1).mean()
  return 0.5 * (ce(logits) + ce(logits.T))


class InfoNCETest(absltest.TestCase):

  def test_matches_float64_reference_single_and_8_devices(self):
    n = 32
    img, txt = _unit(n, 16, 20), _unit(n, 16, 21)
    want = _infonce_float64(img, txt, 100.0, 0.1)
    single = losses.infonce(img, txt, jnp.log(100.0), 0.1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = jax.jit(lambda a, b: losses.infonce(a, b, jnp.log(100.0), 0.1))(
        jax.device_put(img, sh), jax.device_put(txt, sh))
    print(f"infonce float64={want:.8f} single={float(single):.8f} "
          f"{len(jax.devices())}-device={float(sharded):.8f}")
    np.testing.assert_allclose(float(single), want, rtol=1e-5)
    np.testing.assert_allclose(float(sharded), want, rtol=1e-5)

  def test_matches_torch_cross_entropy_with_label_smoothing(self):
    img, txt = _unit(16, 32, 0), _unit(16, 32, 1)
    scale = np.log(50.0)
    ours = float(losses.infonce(jnp.asarray(img), jnp.asarray(txt),
                                jnp.asarray(scale), label_smoothing=0.1))
    ti = F.normalize(torch.from_numpy(img), dim=-1)
    tt = F.normalize(torch.from_numpy(txt), dim=-1)
    logits = 50.0 * ti @ tt.T
    labels = torch.arange(16)
    ref = 0.5 * (F.cross_entropy(logits, labels, label_smoothing=0.1) +
                 F.cross_entropy(logits.T, labels, label_smoothing=0.1))
    print(f"infonce vs torch CE(label_smoothing=0.1): {ours} vs {ref.item()}")
    np.testing.assert_allclose(ours, ref.item(), rtol=1e-5)

  def test_matches_open_clip_loss(self):
    from open_clip.loss import ClipLoss
    img, txt = _unit(8, 16, 2), _unit(8, 16, 3)
    ti = F.normalize(torch.from_numpy(img), dim=-1)
    tt = F.normalize(torch.from_numpy(txt), dim=-1)
    ref = ClipLoss()(ti, tt, torch.tensor(30.0))
    ours = losses.infonce(jnp.asarray(img), jnp.asarray(txt), jnp.log(30.0))
    np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-5)

  def test_features_enter_unnormalised(self):
    # Long-CLIP feeds the PCA reconstruction (norm < 1) to the logits as it is.
    img, txt = _unit(6, 8, 4), _unit(6, 8, 5)
    half = losses.infonce(0.5 * img, txt, jnp.log(40.0))
    np.testing.assert_allclose(float(half), float(losses.infonce(
        img, txt, jnp.log(20.0))), rtol=1e-5)

  def test_logit_scale_cap_keeps_the_gradient_at_the_tie(self):
    cap = float(np.log(100.0))
    clamp = lambda v, m=cap: losses.clamp_logit_scale(jnp.float32(v), m)
    self.assertAlmostEqual(float(clamp(np.log(1000.0))), cap, places=6)
    self.assertAlmostEqual(float(clamp(np.log(1000.0), None)), np.log(1000.0), places=5)
    # At the cap (where Long-CLIP's reset puts it) the gradient is whole,
    # not halved as jnp.minimum's would be; above it, 0.
    self.assertEqual(float(jax.grad(clamp)(jnp.float32(cap))), 1.0)
    self.assertEqual(float(jax.grad(lambda v: jnp.minimum(v, jnp.float32(cap)))(
        jnp.float32(cap))), 0.5)
    self.assertEqual(float(jax.grad(clamp)(jnp.float32(cap + 1))), 0.0)
    self.assertEqual(float(jax.grad(clamp)(jnp.float32(cap - 1))), 1.0)

  def test_global_batch_on_sharded_arrays(self):
    devices = np.array(jax.devices())
    self.assertGreaterEqual(len(devices), 2, "conftest sets 8 CPU devices")
    mesh = jax.sharding.Mesh(devices, ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    n = 2 * len(devices)
    img, txt = _unit(n, 16, 6), _unit(n, 16, 7)
    want = losses.infonce(img, txt, jnp.log(20.0))
    grad_fn = jax.jit(jax.value_and_grad(
        lambda i, t: losses.infonce(i, t, jnp.log(20.0))))
    got, g = grad_fn(jax.device_put(img, sharding), jax.device_put(txt, sharding))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    _, g_ref = jax.value_and_grad(
        lambda i: losses.infonce(i, txt, jnp.log(20.0)))(img)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-4, atol=1e-7)


class PCATest(absltest.TestCase):

  def test_matches_torch_svd_reconstruction_and_gradient(self):
    x = losses.normalize(_features(24, 16, 8))
    k = 5
    ours, vjp = jax.vjp(lambda y: losses.pca_reconstruct(y, k), x)
    cot = _features(24, 16, 9)
    (g_ours,) = vjp(jnp.asarray(cot))

    tx = torch.from_numpy(np.array(x)).double().requires_grad_()
    mean = tx.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(tx - mean, full_matrices=False)
    p = vh[:k].T
    ref = (tx - mean) @ p @ p.T + mean
    (ref * torch.from_numpy(cot).double()).sum().backward()
    np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_ours), tx.grad.numpy(), atol=2e-4)

  def test_rank_and_identity(self):
    x = losses.normalize(_features(32, 16, 10))
    r = losses.pca_reconstruct(x, 4)
    centred = np.asarray(r - r.mean(0))
    self.assertEqual(np.linalg.matrix_rank(centred, tol=1e-4), 4)
    full = losses.pca_reconstruct(x, 16)
    np.testing.assert_allclose(np.asarray(full), np.asarray(x), atol=1e-5)

  def test_gradient_finite_on_rank_deficient_batch(self):
    # 16 rows, 3 distinct: many equal (zero) singular values, k beyond the rank.
    base = _features(3, 32, 13)
    x = np.concatenate([base] * 5 + [base[:1]])
    for k in (2, 8):
      g = jax.grad(lambda y: jnp.sum(losses.pca_reconstruct(
          losses.normalize(y), k) * jnp.arange(32.0)))(x)
      self.assertTrue(np.all(np.isfinite(np.asarray(g))), k)
    # Beyond the rank the reconstruction is the identity, so is its gradient.
    g = jax.grad(lambda y: jnp.sum(losses.pca_reconstruct(y, 8) * jnp.arange(32.0)))(x)
    np.testing.assert_allclose(np.asarray(g), np.tile(np.arange(32.0), (16, 1)),
                               atol=1e-3)

  def test_matches_numpy_svd_float64(self):
    x = np.asarray(losses.normalize(_features(20, 12, 14)), np.float64)
    mean = x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    ref = (x - mean) @ vt[:6].T @ vt[:6] + mean
    np.testing.assert_allclose(np.asarray(losses.pca_reconstruct(x, 6)), ref, atol=1e-5)

  def test_groups(self):
    x = losses.normalize(_features(16, 8, 11))
    got = losses.pca_reconstruct_groups(x, 3, group_size=8)
    want = jnp.concatenate([losses.pca_reconstruct(x[:8], 3),
                            losses.pca_reconstruct(x[8:], 3)])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    # A group larger than the batch is the whole batch.
    np.testing.assert_allclose(
        np.asarray(losses.pca_reconstruct_groups(x, 3, group_size=128)),
        np.asarray(losses.pca_reconstruct(x, 3)), atol=1e-6)
    with self.assertRaisesRegex(ValueError, "pcm_group_size=6"):
      losses.pca_reconstruct_groups(x, 3, group_size=6)

  def test_gradient_finite_at_realistic_batch(self):
    # B < d: the centred batch always has a zero singular value.
    x = _features(32, 64, 12)
    g = jax.grad(lambda y: jnp.sum(losses.pca_reconstruct(
        losses.normalize(y), 8) ** 2))(x)
    self.assertTrue(np.all(np.isfinite(np.asarray(g))))


def _outputs(b=8, d=16, gta=False, seed=0, groups=4):
  rng = np.random.default_rng(seed)
  tower = lambda: {"embedding": jnp.asarray(rng.normal(size=(b, d)), jnp.float32)}
  out = {"image": tower(), "image_masked": tower(), "text_long": tower(),
         "text_short": tower(), "logit_scale": jnp.log(100.0)}
  if gta:
    out["image"]["gta"] = jnp.asarray(rng.normal(size=(groups, b, d)), jnp.float32)
    out["text_long"]["gta"] = jnp.asarray(rng.normal(size=(groups, b, d)), jnp.float32)
  return out


class ObjectiveTest(absltest.TestCase):

  def test_longclip_terms(self):
    out = _outputs()
    loss, terms = losses.longclip_objective(out, short_weight=0.1, pcm_components=4)
    np.testing.assert_allclose(float(loss), float(terms["loss_long"] +
                                                  0.1 * terms["loss_short"]), rtol=1e-6)
    self.assertEqual(int(terms["nonfinite_features"]), 0)

  def test_longclip_nan_batch_is_reported_not_crashing(self):
    out = _outputs()
    emb = out["image"]["embedding"].at[2, 3].set(jnp.nan).at[5].set(jnp.inf)
    out["image"]["embedding"] = emb
    loss, terms = jax.jit(losses.longclip_objective)(out)
    self.assertGreater(int(terms["nonfinite_features"]), 0)
    self.assertTrue(np.isfinite(float(loss)))

  def test_fixclip_terms(self):
    out = _outputs(gta=True)
    loss, terms = losses.fixclip_objective(out, gta_weights=(0.5, 0.5),
                                           gta_first_group=3)
    self.assertSameElements(terms, ["loss_long", "loss_short", "loss_gta_3",
                                    "loss_gta_4", "nonfinite_features"])
    want = (terms["loss_long"] + terms["loss_short"] +
            0.5 * terms["loss_gta_3"] + 0.5 * terms["loss_gta_4"])
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    # L_gta_4 is InfoNCE of the 4th group's features.
    np.testing.assert_allclose(
        float(terms["loss_gta_4"]),
        float(losses.infonce(losses.normalize(out["image"]["gta"][3]),
                             losses.normalize(out["text_long"]["gta"][3]),
                             out["logit_scale"])), rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "gta_weights"):
      losses.fixclip_objective(out, gta_weights=(0.5,), gta_first_group=3)

  def test_fixclip_short_branch_uses_masked_image(self):
    out = _outputs()
    _, terms = losses.fixclip_objective(out)
    want = losses.infonce(losses.normalize(out["image_masked"]["embedding"]),
                          losses.normalize(out["text_short"]["embedding"]),
                          out["logit_scale"])
    np.testing.assert_allclose(float(terms["loss_short"]), float(want), rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
