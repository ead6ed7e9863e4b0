"""Recall@K on embeddings with known answers, and padded batch embedding."""
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from fixclip_jax.data import tokenizers
from fixclip_jax.evaluation import datasets
from fixclip_jax.evaluation import retrieval
from fixclip_jax.models import clip
from fixclip_jax.models import layers
from fixclip_jax.models import sizes


def _embeddings_with_scores(scores):
  """image_emb = identity, so text_emb @ image_emb.T == scores [T, I]."""
  scores = np.asarray(scores, np.float32)
  num_texts, num_images = scores.shape
  return np.eye(num_images, dtype=np.float32), scores


def _reference_recall(image_emb, text_emb, text_to_image, ks):
  """Brute force: the full matrix, a stable sort per query (lowest index wins ties)."""
  sim = text_emb @ image_emb.T                                     # [T, I]
  out = {}
  for k in ks:
    t2i_hits = [text_to_image[t] in np.argsort(-sim[t], kind="stable")[:k]
                for t in range(sim.shape[0])]
    i2t_hits = []
    for i in range(sim.shape[1]):
      top = np.argsort(-sim[:, i], kind="stable")[:k]
      i2t_hits.append(any(text_to_image[t] == i for t in top))
    out[f"t2i_R@{k}"] = 100.0 * np.mean(t2i_hits)
    out[f"i2t_R@{k}"] = 100.0 * np.mean(i2t_hits)
  return out


class RecallTest(parameterized.TestCase):

  def test_hand_constructed(self):
    # Rows: captions; columns: images. Image 0 has 3 captions, only its 3rd is
    # its best match; caption 5 ties across all three images.
    scores = [[0.1, 0.9, 0.0],   # t0 -> img0 at rank 1
              [0.2, 0.1, 0.8],   # t1 -> img0 at rank 1
              [0.9, 0.1, 0.2],   # t2 -> img0 at rank 0
              [0.3, 0.5, 0.1],   # t3 -> img1 at rank 0
              [0.5, 0.5, 0.2],   # t4 -> img2 at rank 2
              [0.1, 0.1, 0.1]]   # t5 -> img2: 3-way tie, lower indices first -> rank 2
    t2i = np.array([0, 0, 0, 1, 2, 2])
    image_emb, text_emb = _embeddings_with_scores(scores)
    m = retrieval.retrieval_metrics(image_emb, text_emb, t2i, ks=(1, 2, 3))
    self.assertAlmostEqual(m["t2i_R@1"], 100 * 2 / 6)
    self.assertAlmostEqual(m["t2i_R@2"], 100 * 4 / 6)
    self.assertAlmostEqual(m["t2i_R@3"], 100.0)
    # img0 column [.1 .2 .9 .3 .5 .1]: its 3rd caption t2 is first -> hit.
    # img1 column [.9 .1 .1 .5 .5 .1]: t3 (0.5) is behind t0; t4 ties it but
    #   has a larger index -> rank 1.
    # img2 column [0 .8 .2 .1 .2 .1]: best own caption t4 (0.2) is behind t1
    #   and behind t2 (equal score, lower index) -> rank 2.
    self.assertAlmostEqual(m["i2t_R@1"], 100 * 1 / 3)
    self.assertAlmostEqual(m["i2t_R@2"], 100 * 2 / 3)
    self.assertAlmostEqual(m["i2t_R@3"], 100.0)
    self.assertEqual(m["num_images"], 3)
    self.assertEqual(m["num_texts"], 6)

  def test_duplicate_images_tie_break_by_index(self):
    image_emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    text_emb = image_emb.copy()
    m = retrieval.retrieval_metrics(image_emb, text_emb, np.arange(3), ks=(1, 2))
    # Caption 1 ties images 0 and 1: image 0 (lower index) wins R@1.
    self.assertAlmostEqual(m["t2i_R@1"], 100 * 2 / 3)
    self.assertAlmostEqual(m["i2t_R@1"], 100 * 2 / 3)
    self.assertAlmostEqual(m["t2i_R@2"], 100.0)

  def test_perfect_and_chunk_independent(self):
    rng = np.random.default_rng(0)
    image_emb = layers.normalize(rng.normal(size=(7, 16)), xp=np)
    t2i = np.repeat(np.arange(7), 3)
    text_emb = image_emb[t2i]
    for chunk in (1, 4, 100):
      m = retrieval.retrieval_metrics(image_emb, text_emb, t2i, chunk_size=chunk)
      for key in ("i2t_R@1", "t2i_R@1", "i2t_R@10"):
        self.assertEqual(m[key], 100.0)

  @parameterized.parameters((5, 1, 3), (4, 3, 7), (3, 2, 1000))
  def test_matches_brute_force(self, seed, quantise, chunk):
    rng = np.random.default_rng(seed)
    num_images = 23
    caps = rng.integers(1, 6, size=num_images)          # 1..5 captions each
    t2i = np.repeat(np.arange(num_images), caps)
    rng.shuffle(t2i)                                     # captions not grouped
    image_emb = rng.normal(size=(num_images, 8)).astype(np.float32)
    text_emb = (image_emb[t2i] + 1.5 * rng.normal(size=(len(t2i), 8))
                ).astype(np.float32)
    # Coarse integer values make many exact ties.
    image_emb, text_emb = np.round(image_emb * quantise), np.round(text_emb * quantise)
    ks = (1, 5, 10)
    got = retrieval.retrieval_metrics(image_emb, text_emb, t2i, ks, chunk_size=chunk)
    want = _reference_recall(image_emb, text_emb, t2i, ks)
    for key, value in want.items():
      self.assertAlmostEqual(got[key], value, places=4, msg=key)

  def test_bad_pairing(self):
    e = np.eye(3, dtype=np.float32)
    with self.assertRaisesRegex(ValueError, "no caption"):
      retrieval.retrieval_metrics(e, e, np.array([0, 0, 1]))
    with self.assertRaisesRegex(ValueError, "outside"):
      retrieval.retrieval_metrics(e, e, np.array([0, 1, 3]))


_COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "white": (255, 255, 255), "olive": (128, 128, 0),
           "navy": (0, 0, 128), "teal": (0, 128, 128), "gray": (90, 90, 90)}


def _color_dataset(test):
  """8 solid-colour images; image k has k % 3 + 1 captions naming its colour."""
  root = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, root, ignore_errors=True)
  paths, caps = [], []
  for k, (name, rgb) in enumerate(_COLORS.items()):
    path = os.path.join(root, f"{k}.jpg" if k % 2 else f"{k}.png")
    Image.new("RGB", (40 + 7 * k, 30), rgb).save(path)
    paths.append(path)
    caps.append([f"a photo of {name}"] * (k % 3 + 1))
  return datasets.from_groups("colors", "colors-test", paths, caps)


def _word_tokenizer(texts, context=6):
  """Last word -> colour id + 1 (0 pads), in a fixed-width int32 batch."""
  names = list(_COLORS)
  out = np.zeros((len(texts), context), np.int32)
  for i, t in enumerate(texts):
    out[i, 0] = names.index(t.split()[-1]) + 1
  return out


def _color_embed_fns(image_size, calls):
  """Image -> mean normalised pixel; text -> the same vector for its colour."""
  mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
  std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
  table = np.stack([np.zeros(3, np.float32)] +
                   [(np.array(c, np.float32) / 255 - mean) / std
                    for c in _COLORS.values()])                       # [9, 3]

  def embed_images(pixels):
    calls.append(("image", pixels.shape))
    # A constant last coordinate keeps zero-padded rows away from a 0 norm.
    return np.concatenate([pixels.mean(axis=(1, 2)),
                           np.ones((pixels.shape[0], 1))], axis=1)

  def embed_texts(tokens):
    calls.append(("text", tokens.shape))
    return np.concatenate([table[tokens[:, 0]], np.ones((tokens.shape[0], 1))],
                          axis=1)

  return embed_images, embed_texts


class EmbedTest(absltest.TestCase):

  def test_padding_does_not_change_results(self):
    ds = _color_dataset(self)
    self.assertEqual((ds.num_images, ds.num_texts), (8, 15))
    results = {}
    for batch_size in (3, 7):
      calls = []
      fi, ft = _color_embed_fns(24, calls)
      image_emb, text_emb = retrieval.embed_dataset(
          ds, fi, ft, _word_tokenizer, batch_size=batch_size, image_size=24)
      # Every call sees the full batch size (one compiled shape).
      self.assertTrue(all(shape[0] == batch_size for _, shape in calls))
      self.assertEqual(image_emb.shape, (8, 4))
      self.assertEqual(text_emb.shape, (15, 4))
      np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1, rtol=1e-5)
      results[batch_size] = (image_emb, text_emb)
      metrics = retrieval.evaluate_retrieval(
          ds, fi, ft, _word_tokenizer, batch_size=batch_size, image_size=24)
      self.assertEqual(metrics["protocol"], "colors-test")
      self.assertEqual(metrics["dataset"], "colors")
      # Each caption's vector is exactly its image's: everything at rank 0.
      self.assertEqual(metrics["i2t_R@1"], 100.0)
      self.assertEqual(metrics["t2i_R@1"], 100.0)
    np.testing.assert_array_equal(results[3][0], results[7][0])
    np.testing.assert_array_equal(results[3][1], results[7][1])

  def test_tiny_clip_jitted_with_clip_tokenizer(self):
    cfg = sizes.get_config("tiny")
    params = clip.init_params(cfg, jax.random.PRNGKey(1))
    model = clip.CLIP(cfg)
    image_fn = jax.jit(lambda x: model.apply(
        {"params": params}, x, method=model.encode_image)["embedding"])
    text_fn = jax.jit(lambda t: model.apply(
        {"params": params}, t, method=model.encode_text)["embedding"])
    tok = tokenizers.get_tokenizer("clip", context_length=cfg.context_length)
    ds = _color_dataset(self)
    embs = [retrieval.embed_dataset(ds, image_fn, text_fn, tok, batch_size=b,
                                    image_size=cfg.image_size)
            for b in (3, 7)]
    self.assertEqual(embs[0][0].shape, (8, cfg.embed_dim))
    self.assertEqual(embs[0][1].shape, (15, cfg.embed_dim))
    np.testing.assert_allclose(embs[0][0], embs[1][0], atol=2e-5)
    np.testing.assert_allclose(embs[0][1], embs[1][1], atol=2e-5)
    # Same caption text -> same embedding, whichever batch it fell in.
    np.testing.assert_allclose(embs[0][1][ds.image_to_texts[7][0]],
                               embs[0][1][ds.image_to_texts[7][1]], atol=1e-6)
    direct = np.asarray(text_fn(jnp.asarray(tok(["a photo of red"]))))[0]
    np.testing.assert_allclose(embs[0][1][0], direct / np.linalg.norm(direct),
                               atol=2e-5)

  def test_unreadable_image_names_the_file(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    bad = os.path.join(root, "broken.jpg")
    with open(bad, "wb") as f:
      f.write(b"not an image")
    with self.assertRaisesRegex(OSError, "broken.jpg"):
      retrieval.embed_images([bad], lambda x: x.reshape(len(x), -1), 2, 8)


if __name__ == "__main__":
  absltest.main()
