"""FIX-CLIP model pieces (method.md §3): mask, prompts, masking, GTA heads."""
from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from fixclip_jax import losses
from fixclip_jax.models import clip
from fixclip_jax.models import fixclip
from fixclip_jax.models import sizes


def _allowed_by_rule(q, k, m, region_of_token):
  """method.md §3 read literally; tokens are [CLS, P_0..P_{m-1}, patches]."""
  kind = lambda t: "cls" if t == 0 else ("prompt" if t <= m else "patch")
  if kind(q) == "cls":
    return True
  if kind(q) == "patch":
    return kind(k) in ("cls", "patch")
  # Prompt j = q - 1: itself and the patches of region j.
  return k == q or (kind(k) == "patch" and region_of_token[k] == q - 1)


class MaskTest(parameterized.TestCase):

  @parameterized.parameters(("grid", 14, 4), ("strips", 14, 4), ("grid", 7, 6),
                            ("strips", 5, 3), ("grid", 6, 1))
  def test_every_pair(self, layout, grid, m):
    regions = fixclip.patch_regions(grid, m, layout)
    self.assertEqual(sorted(set(regions.tolist())), list(range(m)))
    mask = np.asarray(fixclip.regional_prompt_mask(regions, m))
    t = 1 + m + grid * grid
    self.assertEqual(mask.shape, (t, t))
    region_of_token = {1 + m + p: int(r) for p, r in enumerate(regions)}
    want = np.array([[_allowed_by_rule(q, k, m, region_of_token) for k in range(t)]
                     for q in range(t)])
    np.testing.assert_array_equal(mask, want)

  def test_grid_regions_are_rectangles(self):
    regions = fixclip.patch_regions(14, 4, "grid").reshape(14, 14)
    np.testing.assert_array_equal(regions[:7, :7], 0)
    np.testing.assert_array_equal(regions[:7, 7:], 1)
    np.testing.assert_array_equal(regions[7:, :7], 2)
    np.testing.assert_array_equal(regions[7:, 7:], 3)
    strips = fixclip.patch_regions(14, 4, "strips")
    self.assertTrue(np.all(np.diff(strips) >= 0))  # contiguous raster runs

  def test_bad_layout(self):
    with self.assertRaisesRegex(ValueError, "region layout 'rings'"):
      fixclip.patch_regions(4, 4, "rings")


def _block_outputs(model, params, images, **kw):
  """Output of every vision residual block: {layer: [B, T, w]}."""
  _, state = model.apply({"params": params}, images, method=clip.CLIP.encode_image,
                         capture_intermediates=True, **kw)
  inter = state["intermediates"]["visual"]["transformer"]
  return {int(k.split("_")[1]): v["__call__"][0] for k, v in inter.items()
          if k.startswith("resblocks_")}


class PromptTest(absltest.TestCase):

  def test_patch_tokens_never_read_prompts(self):
    """Patches never attend to prompts, so a layer's patch outputs equal the
    prompt-free tower's whenever its input does: at the first layer exactly.
    From the second layer on they differ, but only through CLS (which reads
    the prompts and which patches attend to, method.md §3) -- so replacing
    the prompts' values must leave the first layer's patches untouched."""
    base = sizes.get_config("tiny")
    cfg = base.replace(num_prompts=4)
    params = clip.init_params(cfg, jax.random.PRNGKey(1))
    plain = {**params, "visual": {**params["visual"], "transformer": {
        k: v for k, v in params["visual"]["transformer"].items()
        if not k.startswith("prompts_")}}}
    images = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
    with_p = _block_outputs(clip.CLIP(cfg), params, images)
    without = _block_outputs(clip.CLIP(base), plain, images)
    self.assertLen(with_p, cfg.vision_layers)
    m = cfg.num_prompts
    np.testing.assert_allclose(with_p[0][:, 1 + m:], without[0][:, 1:],
                               rtol=1e-5, atol=1e-5)
    for layer in range(cfg.vision_layers):
      self.assertGreater(
          float(jnp.abs(with_p[layer][:, 0] - without[layer][:, 0]).max()), 1e-3)
    # Prompt j's output depends only on its own region: perturbing region 3's
    # patches leaves prompts 0..2 unchanged at the first layer.
    grid = cfg.grid_size
    region3 = (fixclip.patch_regions(grid, m, cfg.region_layout) == 3
               ).reshape(grid, grid)
    pix = np.kron(region3, np.ones((cfg.patch_size, cfg.patch_size)))[None, ..., None]
    moved = _block_outputs(clip.CLIP(cfg), params, images + 5.0 * pix)
    np.testing.assert_allclose(moved[0][:, 1:1 + 3], with_p[0][:, 1:1 + 3],
                               rtol=1e-5, atol=1e-5)
    self.assertGreater(float(jnp.abs(moved[0][:, 4] - with_p[0][:, 4]).max()), 1e-3)

  def test_carried_prompts_bring_regions_to_the_embedding(self):
    """prompt_mode=carry: the region layout (which patches each prompt reads)
    changes the image embedding and the GTA features. prompt_mode=fresh (the
    ablation's control): prompts re-inserted from their parameters at every
    layer, so the layout reaches no output -- bit-identical features."""
    cfg = sizes.get_config("tiny", num_prompts=4, gta_groups=2)
    params = clip.init_params(cfg, jax.random.PRNGKey(3))
    images = jax.random.normal(jax.random.PRNGKey(4), (3, 32, 32, 3))

    def features(mode, layout):
      out = clip.CLIP(cfg.replace(prompt_mode=mode, region_layout=layout)).apply(
          {"params": params}, images, method=clip.CLIP.encode_image)
      return np.asarray(out["embedding"]), np.asarray(out["gta"])

    for got, want in zip(features("carry", "strips"), features("carry", "grid")):
      self.assertGreater(float(np.abs(got - want).max()), 1e-3)
    for got, want in zip(features("fresh", "strips"), features("fresh", "grid")):
      np.testing.assert_array_equal(got, want)

  def test_second_layer_prompts_start_from_the_first_layers_outputs(self):
    """Under carry, layer 1's prompt tokens are layer 0's prompt outputs plus
    layer 1's parameters (docs/method.md §3): rebuilt here from layer 0's
    block output and run through block 1 by hand."""
    cfg = sizes.get_config("tiny", num_prompts=4)
    params = clip.init_params(cfg, jax.random.PRNGKey(5))
    images = jax.random.normal(jax.random.PRNGKey(6), (2, 32, 32, 3))
    m = cfg.num_prompts
    carry = _block_outputs(clip.CLIP(cfg), params, images)
    fresh = _block_outputs(clip.CLIP(cfg.replace(prompt_mode="fresh")), params,
                           images)
    # The first prompted layer has nothing to carry: both modes agree there.
    np.testing.assert_array_equal(carry[0], fresh[0])
    w = params["visual"]["transformer"]
    block1 = clip.remat_block(False)(cfg.vision_heads, cfg.vision_mlp_dim, cfg.act,
                                     jnp.float32, None)
    regions = fixclip.patch_regions(cfg.grid_size, m, cfg.region_layout)
    mask = fixclip.regional_prompt_mask(regions[None], m)[:, None]
    x0 = carry[0]                                                   # [B, 1+M+N, w]
    y_in = jnp.concatenate([x0[:, :1], x0[:, 1:1 + m] + w["prompts_1"],
                            x0[:, 1 + m:]], axis=1)
    want = block1.apply({"params": w["resblocks_1"]}, y_in, mask, None, False)
    np.testing.assert_allclose(carry[1], want, rtol=1e-5, atol=1e-5)
    self.assertGreater(float(jnp.abs(carry[1][:, 1:1 + m] -
                                     fresh[1][:, 1:1 + m]).max()), 1e-3)

  def test_prompt_layer_range(self):
    cfg = sizes.get_config("tiny", num_prompts=2, prompt_layers=(1, 2))
    params = clip.init_params(cfg)
    self.assertEqual([k for k in params["visual"]["transformer"] if "prompt" in k],
                     ["prompts_1"])


class MaskingTest(absltest.TestCase):

  def test_counts_and_randomness(self):
    n, ratio = 196, 0.75
    masked, keep = fixclip.random_patch_mask(jax.random.PRNGKey(0), 4, n, ratio)
    np.testing.assert_array_equal(np.asarray(masked).sum(1), round(ratio * n))
    self.assertEqual(keep.shape, (4, n - round(ratio * n)))
    # The kept indices are exactly the unmasked patches, sorted.
    for b in range(4):
      np.testing.assert_array_equal(np.flatnonzero(~np.asarray(masked[b])), keep[b])
    self.assertFalse(np.array_equal(masked[0], masked[1]))   # per image
    again, _ = fixclip.random_patch_mask(jax.random.PRNGKey(0), 4, n, ratio)
    np.testing.assert_array_equal(masked, again)             # same key
    other, _ = fixclip.random_patch_mask(jax.random.PRNGKey(1), 4, n, ratio)
    self.assertFalse(np.array_equal(masked, other))          # per step

  def test_mask_token_replaces_and_drop_matches_attention_free_case(self):
    cfg = sizes.get_config("tiny", mask_token=True)
    params = clip.init_params(cfg)
    np.testing.assert_array_equal(params["visual"]["mask_token"], 0)  # zero init
    model = clip.CLIP(cfg)
    images = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3))
    masked, keep = fixclip.random_patch_mask(jax.random.PRNGKey(4), 2, 16, 0.75)
    enc = lambda **kw: model.apply({"params": params}, images,
                                   method=clip.CLIP.encode_image, **kw)
    full, rep, drop = enc(), enc(patch_mask=masked), enc(keep_index=keep)
    self.assertEqual(drop["tokens"].shape, (2, 1 + 4, cfg.vision_width))
    self.assertGreater(float(jnp.abs(full["embedding"] - rep["embedding"]).max()), 1e-4)
    self.assertGreater(float(jnp.abs(rep["embedding"] - drop["embedding"]).max()), 1e-4)

  def test_ratio_must_leave_a_patch(self):
    with self.assertRaisesRegex(ValueError, "no visible patch"):
      fixclip.random_patch_mask(jax.random.PRNGKey(0), 1, 4, 1.0)


class GTATest(absltest.TestCase):

  def test_weights_and_group_features_match_numpy(self):
    w = fixclip.gaussian_group_weights(3, 1.0)
    ref = np.exp(-0.5 * np.array([4.0, 1.0, 0.0]))
    np.testing.assert_allclose(w, ref / ref.sum(), rtol=1e-6)

    heads = fixclip.GTAHeads(num_groups=2, out_dim=5)
    tokens = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 8))  # [L, B, w]
    params = heads.init(jax.random.PRNGKey(1), tokens)["params"]
    got = np.asarray(heads.apply({"params": params}, tokens))
    t = np.asarray(tokens, np.float64)
    for g in range(2):
      pooled = np.einsum("sbw,s->bw", t[3 * g:3 * g + 3], w)
      y = pooled @ np.asarray(params[f"linear_{g}"]["kernel"]) + params[f"linear_{g}"]["bias"]
      y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)
      y = y * params[f"ln_{g}"]["scale"] + params[f"ln_{g}"]["bias"]
      np.testing.assert_allclose(got[g], y, rtol=1e-4, atol=1e-5)


class GradientTest(absltest.TestCase):

  def test_gradients_reach_new_params_not_frozen_rows(self):
    cfg = sizes.get_config("tiny", context_length=248, positional_keep=20,
                           num_prompts=4, mask_token=True, gta_groups=2)
    params = clip.init_params(cfg)
    model = clip.CLIP(cfg)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
    text = np.zeros((4, 248), np.int32)
    text[:, 0] = 49406
    text[:, 1:60] = rng.integers(1, 49000, size=(4, 59))
    text[:, 60] = 49407
    masked, _ = fixclip.random_patch_mask(jax.random.PRNGKey(0), 4, 16, 0.75)

    def loss_fn(p):
      out = model.apply({"params": p}, images, jnp.asarray(text), jnp.asarray(text),
                        patch_mask=masked, method=clip.CLIP.train_outputs)
      return losses.fixclip_objective(out, gta_weights=(0.5,), gta_first_group=2)[0]

    g = jax.grad(loss_fn)(params)
    norm = lambda x: float(jnp.abs(x).max())
    self.assertGreater(norm(g["visual"]["transformer"]["prompts_0"]), 0)
    self.assertGreater(norm(g["visual"]["transformer"]["prompts_1"]), 0)
    self.assertGreater(norm(g["visual"]["mask_token"]), 0)
    self.assertGreater(norm(g["visual"]["gta"]["linear_1"]["kernel"]), 0)
    self.assertGreater(norm(g["text"]["gta"]["linear_1"]["kernel"]), 0)
    # Two-table positions: rows < 20 of the residual table and rows >= 20 of the
    # frozen table get no gradient; the rows actually used do.
    self.assertEqual(norm(g["text"]["positional_embedding_res"][:20]), 0)
    self.assertEqual(norm(g["text"]["positional_embedding"][20:]), 0)
    self.assertGreater(norm(g["text"]["positional_embedding_res"][20:61]), 0)


if __name__ == "__main__":
  absltest.main()
