"""buckets.py: text cut to length buckets gives the unbucketed features and
loss (float32, <= 1e-6 relative), leaves vision bit-identical, agrees across
hosts, and compiles at most len(long) x len(short) step variants."""
import os
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from fixclip_jax import buckets
from fixclip_jax import config_base
from fixclip_jax import sharding
from fixclip_jax import step as step_lib
from fixclip_jax.models import clip
from fixclip_jax.models import sizes

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = 49407


def demo_config():
  """configs/demo.py: tiny FIX-CLIP (regional prompts, mask token, GTA heads,
  two-table positions), float32."""
  c = config_base.load_config_file(os.path.join(_ROOT, "configs", "demo.py"))
  c.data.global_batch = 8
  return c


def captions(rng, batch, width, lengths, eot=EOT, pad=0):
  """[B, width] ids: start token, random ids, EOT at length - 1, padding."""
  ids = np.full((batch, width), pad, np.int32)
  for row, n in enumerate(lengths):
    ids[row, 0] = 49406
    ids[row, 1:n - 1] = rng.integers(1, 49000, n - 2)
    ids[row, n - 1] = eot
  return ids


def host_batch(cfg, seed=0, batch=8, long_max=40, short_max=20):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (batch, cfg.image_size, cfg.image_size, 3),
                                dtype=np.uint8),
          "text_long": captions(rng, batch, 248, rng.integers(3, long_max + 1, batch)),
          "text_short": captions(rng, batch, 77, rng.integers(3, short_max + 1, batch))}


def assert_relative(test, got, want, tol=1e-6, name=""):
  """max |got - want| <= tol * max |want| (float32 rounding of a shorter sum)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  test.assertEqual(got.shape, want.shape, name)
  scale = max(np.abs(want).max(), 1e-30)
  test.assertLessEqual(np.abs(got - want).max() / scale, tol, name)


class BucketRuleTest(absltest.TestCase):

  def test_bucket_length(self):
    self.assertEqual(buckets.bucket_length(40, (64, 96, 248), 248), 64)
    self.assertEqual(buckets.bucket_length(64, (64, 96, 248), 248), 64)
    self.assertEqual(buckets.bucket_length(65, (64, 96, 248), 248), 96)
    self.assertEqual(buckets.bucket_length(200, (64, 96), 248), 248)   # none fits
    self.assertEqual(buckets.bucket_length(10, (), 248), 248)          # off
    self.assertEqual(buckets.bucket_length(10, (16, 77), 77), 16)
    self.assertEqual(buckets.bucket_length(50, (16, 96), 77), 77)      # > width

  def test_pool_index_is_the_models_rule(self):
    ids = np.array([[49406, 5, EOT, 0, 0], [49406, 7, 8, 9, EOT]])
    np.testing.assert_array_equal(buckets.pool_index(ids), [2, 4])
    self.assertEqual(buckets.longest_caption(ids), 5)
    # SentencePiece-like: eos id 2, pad id 3 (not 0): the eos decides.
    sp = np.array([[1, 7, 2, 3, 3, 3], [1, 7, 7, 2, 3, 3]])
    np.testing.assert_array_equal(buckets.pool_index(sp, eot_token_id=2), [2, 3])
    self.assertEqual(buckets.longest_caption(sp, eot_token_id=2), 4)

  def test_cut_to_bucket(self):
    rng = np.random.default_rng(0)
    ids = captions(rng, 4, 248, [5, 30, 17, 9])
    cut = buckets.cut_to_bucket(ids, (16, 32, 64))
    self.assertEqual(cut.shape, (4, 32))
    np.testing.assert_array_equal(cut, ids[:, :32])
    self.assertIs(buckets.cut_to_bucket(ids, ()), ids)
    zeros = np.zeros((2, 77), np.int32)          # padded eval rows pool at 0
    self.assertEqual(buckets.cut_to_bucket(zeros, (16, 32)).shape, (2, 16))

  def test_bad_buckets(self):
    with self.assertRaisesRegex(ValueError, "distinct positive"):
      buckets.TextBuckets(long_buckets=(64, 0))
    with self.assertRaisesRegex(ValueError, "distinct positive"):
      buckets.TextBuckets(short_buckets=(16, 16))

  def test_eval_buckets_are_the_union(self):
    c = config_base.base_config()
    self.assertEqual(buckets.eval_buckets(c.data), tuple(sorted(
        set(c.data.long_buckets) | set(c.data.short_buckets))))
    c.data.long_buckets, c.data.short_buckets = (), ()
    self.assertEqual(buckets.eval_buckets(c.data), ())


class TextBucketsTest(absltest.TestCase):

  def test_cuts_both_texts_and_counts_variants(self):
    tb = buckets.TextBuckets((64, 128, 248), (16, 32, 77))
    cfg = sizes.model_config(demo_config())
    b = host_batch(cfg, long_max=100, short_max=20)
    longest = buckets.longest_caption(b["text_long"])
    out = tb(b)
    self.assertEqual(out["text_long"].shape[1], 64 if longest <= 64 else 128)
    self.assertEqual(out["text_short"].shape[1], 32 if
                     buckets.longest_caption(b["text_short"]) > 16 else 16)
    self.assertIs(out["image"], b["image"])
    self.assertLen(tb.variants, 1)
    tb(b)
    self.assertLen(tb.variants, 1)
    self.assertEqual(tb.max_variants(), 9)
    off = buckets.TextBuckets()
    self.assertFalse(off.enabled)
    self.assertIs(off(b), b)

  def test_hosts_agree_on_the_longest_caption(self):
    """With two processes, the bucket is the max over hosts, not this host's."""
    tb = buckets.TextBuckets((16, 32, 64), (16, 32))
    rng = np.random.default_rng(0)
    local = {"text_long": captions(rng, 2, 248, [5, 10]),
             "text_short": captions(rng, 2, 77, [4, 6])}
    other_host = np.array([40, 20], np.int32)    # its longest long / short

    def allgather(x):
      return np.stack([np.asarray(x), other_host])

    with mock.patch.object(jax, "process_count", return_value=2), \
        mock.patch.object(buckets.multihost_utils, "process_allgather",
                          side_effect=allgather) as gather:
      out = tb(local)
    gather.assert_called_once()
    self.assertEqual(out["text_long"].shape, (2, 64))
    self.assertEqual(out["text_short"].shape, (2, 32))
    # One process: no collective, the local maximum.
    self.assertEqual(tb(local)["text_long"].shape, (2, 16))


class EvalAndEmbedTest(absltest.TestCase):

  def test_eval_text_fn_cuts_and_gives_the_same_features(self):
    from fixclip_jax.evaluation import run as eval_run  # pylint: disable=g-import-not-at-top
    cfg = sizes.model_config(demo_config())
    model = clip.CLIP(cfg)
    params = clip.init_params(cfg, jax.random.PRNGKey(5))
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    tokens = captions(rng, 8, 248, rng.integers(3, 41, 8))       # longest <= 40
    _, full_fn = eval_run.embed_fns(model, params, mesh)
    _, cut_fn = eval_run.embed_fns(model, params, mesh, text_buckets=(16, 64, 248))
    shapes, real_cut = [], buckets.cut_to_bucket

    def recording_cut(*args, **kwargs):
      out = real_cut(*args, **kwargs)
      shapes.append(out.shape)
      return out

    with mock.patch.object(buckets, "cut_to_bucket", side_effect=recording_cut):
      got = cut_fn(tokens)
    self.assertEqual(shapes, [(8, 64)])
    assert_relative(self, got, full_fn(tokens))

  def test_embed_cuts_each_batch(self):
    from fixclip_jax import embed  # pylint: disable=g-import-not-at-top
    widths = []

    class FakeModel:                       # api.Model's public text interface
      batch_size = 2
      cfg = sizes.model_config(demo_config())

      def tokenize(self, texts):
        rng = np.random.default_rng(0)
        return captions(rng, len(texts), 248, [len(t) for t in texts])

      def encode_tokens(self, tokens):
        widths.append(tokens.shape[1])
        return np.ones((tokens.shape[0], 4), np.float32)

      def encode_text(self, texts):
        return self.encode_tokens(self.tokenize(texts))

    texts = ["x" * 10, "x" * 12, "x" * 100, "x" * 30, "x" * 5]   # lengths in tokens
    out = embed.encode_texts_bucketed(FakeModel(), texts, (16, 32, 64, 128, 248))
    self.assertEqual(out.shape, (5, 4))
    self.assertEqual(widths, [16, 128, 16])
    widths.clear()
    embed.encode_texts_bucketed(FakeModel(), texts, ())
    self.assertEqual(widths, [248])
    self.assertEqual(embed.TEXT_BUCKETS,
                     buckets.eval_buckets(config_base.base_config().data))


class ExactnessTest(parameterized.TestCase):
  """The bucketed text path computes what the full-context path computes."""

  @parameterized.named_parameters(
      ("two_tables_argmax_eot", 20, None),
      ("one_table", None, None),
      ("configured_eot_id", 20, EOT))
  def test_text_tower_features(self, positional_keep, eot_token_id):
    c = demo_config()
    c.model.positional_keep = positional_keep
    c.model.eot_token_id = eot_token_id
    cfg = sizes.model_config(c)
    model = clip.CLIP(cfg)
    params = clip.init_params(cfg, jax.random.PRNGKey(3))
    b = host_batch(cfg, seed=1)
    tb = buckets.TextBuckets(c.data.long_buckets, c.data.short_buckets, eot_token_id)
    cut = tb(b)
    self.assertLess(cut["text_long"].shape[1], 248)
    encode = jax.jit(lambda p, t: model.apply({"params": p}, t,
                                              method=clip.CLIP.encode_text))
    for key in ("text_long", "text_short"):
      full, short = encode(params, b[key]), encode(params, cut[key])
      # Pooled features, every layer's EOT token (GTA's input), GTA groups.
      for name in ("embedding", "pooled", "layer_tokens", "gta"):
        assert_relative(self, short[name], full[name], name=f"{key}/{name}")
      # Every kept position too (padding after the EOT included).
      assert_relative(self, short["tokens"], full["tokens"][:, :cut[key].shape[1]],
                      name=f"{key}/tokens")

  def test_train_step_loss_and_vision_untouched(self):
    c = demo_config()
    cfg = sizes.model_config(c)
    model = step_lib.make_model(c, cfg)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    b = host_batch(cfg, seed=2)
    cut = buckets.TextBuckets.from_data_config(c.data, cfg.eot_token_id)(b)
    self.assertEqual(cut["text_long"].shape[1], 64)
    self.assertEqual(cut["text_short"].shape[1], 32)

    # The model's outputs as the step computes them (same masks both ways).
    params = clip.init_params(cfg, jax.random.PRNGKey(0))
    masks = step_lib.image_masks(c.masking, jax.random.PRNGKey(1), 8, cfg.num_patches)
    images = np.asarray(b["image"], np.float32) / 255.0
    outputs = jax.jit(lambda p, x, t, s: model.apply(
        {"params": p}, x, t, s, method=clip.CLIP.train_outputs, **masks))
    full = outputs(params, images, b["text_long"], b["text_short"])
    short = outputs(params, images, cut["text_long"], cut["text_short"])
    # Vision (regional prompts, mask token, GTA) sees the same input: same bits.
    for branch in ("image", "image_masked"):
      for name in ("embedding", "layer_tokens", "gta"):
        np.testing.assert_array_equal(short[branch][name], full[branch][name])
    for branch in ("text_long", "text_short"):
      for name in ("embedding", "layer_tokens", "gta"):
        assert_relative(self, short[branch][name], full[branch][name],
                        name=f"{branch}/{name}")

    # One train step each from the same state: loss, each term, gradient norm.
    metrics = {}
    for name, batch in (("full", b), ("cut", cut)):
      state, shardings, tx = step_lib.init_state(c, model, mesh)
      step = step_lib.jit_train_step(step_lib.make_train_step(c, model, tx),
                                     mesh, shardings, sharding.global_batch(batch, mesh))
      _, m = step(state, sharding.global_batch(batch, mesh))
      metrics[name] = jax.device_get(m)
    for key in ("loss", "loss_long", "loss_short", "loss_gta_2", "grad_norm"):
      assert_relative(self, metrics["cut"][key], metrics["full"][key], name=key)


class CompiledVariantsTest(absltest.TestCase):

  def test_at_most_long_times_short_variants(self):
    c = config_base.base_config()
    c.model_name = "tiny"
    c.model.update(dict(vision_layers=1, text_layers=1, context_length=32,
                        num_prompts=0, gta_groups=0, mask_token=False))
    c.objective = "longclip"
    c.dtype = "float32"
    c.data.image_size = 32
    c.data.text_context, c.data.short_context = 32, 16
    c.data.long_buckets, c.data.short_buckets = (8, 16, 32), (4, 8, 16)
    c.data.global_batch = 4
    cfg = sizes.model_config(c)
    model = step_lib.make_model(c, cfg)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    state, shardings, tx = step_lib.init_state(c, model, mesh)
    tb = buckets.TextBuckets.from_data_config(c.data, cfg.eot_token_id)
    rng = np.random.default_rng(0)
    step = None
    for _ in range(8):
      # Batches of short, medium and long captions, in random order.
      long_max, short_max = rng.choice([6, 12, 32]), rng.choice([4, 8, 16])
      batch = tb({"image": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
                  "text_long": captions(rng, 4, 32, rng.integers(3, long_max + 1, 4)),
                  "text_short": captions(rng, 4, 16,
                                         rng.integers(3, short_max + 1, 4))})
      batch = sharding.global_batch(batch, mesh)
      if step is None:
        step = step_lib.jit_train_step(step_lib.make_train_step(c, model, tx),
                                       mesh, shardings, batch)
      state, _ = step(state, batch)
    bound = len(c.data.long_buckets) * len(c.data.short_buckets)
    self.assertEqual(tb.max_variants(), bound)
    self.assertGreater(len(tb.variants), 2)
    # jax.jit compiles once per input shape: one variant per bucket pair seen.
    self.assertEqual(step._cache_size(), len(tb.variants))
    self.assertLessEqual(step._cache_size(), bound)


if __name__ == "__main__":
  absltest.main()
