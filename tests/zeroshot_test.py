"""Zero-shot classification: prompt-ensemble weights and top-k on known answers."""
import os
import shutil
import tempfile

from absl.testing import absltest
import numpy as np
from PIL import Image

from fixclip_jax.evaluation import datasets
from fixclip_jax.evaluation import imagenet_classes
from fixclip_jax.evaluation import zeroshot

_CLASSES = ["cat", "dog", "red car", "tree", "boat"]
_TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]


def _lookup_tokenizer(texts):
  """(class index, template index) of each prompt as two int32 tokens."""
  out = np.zeros((len(texts), 4), np.int32)
  for i, t in enumerate(texts):
    matches = [(c, k) for c, name in enumerate(_CLASSES)
               for k, tpl in enumerate(_TEMPLATES) if tpl.format(name) == t]
    assert len(matches) == 1, t
    out[i, :2] = matches[0]
  return out


class ClassifierWeightsTest(absltest.TestCase):

  def test_mean_of_normalised_prompts_renormalised(self):
    rng = np.random.default_rng(0)
    class_vec = rng.normal(size=(len(_CLASSES), 6))
    template_vec = rng.normal(size=(len(_TEMPLATES), 6))
    calls = []

    def embed_texts(tokens):
      calls.append(tokens.shape[0])
      # Unnormalised, different norms per prompt: the order of normalising
      # and averaging matters.
      scale = 1.0 + tokens[:, 1:2]
      return scale * (class_vec[tokens[:, 0]] + template_vec[tokens[:, 1]])

    got = zeroshot.classifier_weights(_CLASSES, _TEMPLATES, embed_texts,
                                      _lookup_tokenizer, batch_size=4,
                                      classes_per_chunk=2)
    self.assertEqual(set(calls), {4})
    want = np.zeros((len(_CLASSES), 6))
    for c in range(len(_CLASSES)):
      for k in range(len(_TEMPLATES)):
        v = class_vec[c] + template_vec[k]
        want[c] += v / np.linalg.norm(v)
      want[c] /= np.linalg.norm(want[c])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_bad_template(self):
    with self.assertRaisesRegex(ValueError, "no"):
      zeroshot.classifier_weights(["a"], ["a photo"], None, None, 2)

  def test_openai_lists(self):
    self.assertLen(imagenet_classes.IMAGENET_CLASSNAMES, 1000)
    self.assertLen(set(imagenet_classes.OPENAI_IMAGENET_TEMPLATES), 80)
    self.assertEqual(imagenet_classes.IMAGENET_CLASSNAMES[0], "tench")
    self.assertEqual(imagenet_classes.IMAGENET_CLASSNAMES[-1], "toilet paper")
    self.assertEqual(imagenet_classes.OPENAI_IMAGENET_TEMPLATES[0],
                     "a bad photo of a {}.")


class TopKTest(absltest.TestCase):

  def test_known_ranks(self):
    weights = np.eye(4, dtype=np.float32)
    image_emb = np.array([[0.9, 0.1, 0.0, 0.0],    # label 0: rank 0
                          [0.9, 0.5, 0.3, 0.0],    # label 2: rank 2
                          [0.1, 0.2, 0.3, 0.4],    # label 0: rank 3
                          [0.5, 0.5, 0.0, 0.0],    # label 1: ties class 0 -> rank 1
                          [0.5, 0.5, 0.0, 0.0]],   # label 0: wins the tie -> rank 0
                         np.float32)
    labels = np.array([0, 2, 0, 1, 0])
    m = zeroshot.topk_accuracy(image_emb, labels, weights, ks=(1, 2, 3),
                               chunk_size=2)
    self.assertAlmostEqual(m["top1"], 40.0)
    self.assertAlmostEqual(m["top2"], 60.0)
    self.assertAlmostEqual(m["top3"], 80.0)
    self.assertEqual(m["num_images"], 5)

  def test_matches_brute_force(self):
    rng = np.random.default_rng(3)
    weights = np.round(rng.normal(size=(30, 5)) * 2)
    image_emb = np.round(rng.normal(size=(200, 5)) * 2)
    labels = rng.integers(0, 30, size=200)
    m = zeroshot.topk_accuracy(image_emb, labels, weights, ks=(1, 5),
                               chunk_size=64)
    logits = image_emb @ weights.T
    for k in (1, 5):
      top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
      want = 100.0 * np.mean([labels[i] in top[i] for i in range(200)])
      self.assertAlmostEqual(m[f"top{k}"], want, places=4)

  def test_label_out_of_range(self):
    with self.assertRaisesRegex(ValueError, "labels outside"):
      zeroshot.topk_accuracy(np.eye(2), np.array([0, 5]), np.eye(2))


class EndToEndTest(absltest.TestCase):

  def test_image_folder_colours(self):
    colours = {"red": (250, 10, 10), "green": (10, 250, 10),
               "blue": (10, 10, 250)}
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    for c, (name, rgb) in enumerate(colours.items()):
      os.makedirs(os.path.join(root, f"c{c}"))
      for j in range(c + 2):  # 2, 3, 4 images per class
        Image.new("RGB", (20 + j, 16), rgb).save(
            os.path.join(root, f"c{c}", f"{j}.JPEG"), format="JPEG")
    ds = datasets.load_image_folder(root, class_names=list(colours), name="col")
    names = list(colours)

    def tokenizer(texts):
      return np.array([[names.index(t.split()[-1].rstrip("."))] for t in texts],
                      np.int32)

    def embed_texts(tokens):
      return np.eye(3, dtype=np.float32)[tokens[:, 0]]

    def embed_images(pixels):
      return pixels.mean(axis=(1, 2))  # the dominant channel wins

    templates = ["a photo of {}.", "art of {}"]
    result = zeroshot.evaluate_zeroshot(ds, embed_images, embed_texts,
                                        tokenizer, batch_size=4, image_size=8,
                                        templates=templates)
    self.assertEqual(result["top1"], 100.0)
    self.assertEqual(result["num_images"], 9)
    self.assertEqual(result["dataset"], "col")
    self.assertEqual(result["protocol"], "zeroshot-3cls-2templates")
    emb, labels = zeroshot.embed_classification(ds, embed_images, 4, 8)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1, 2, 2, 2, 2])
    self.assertEqual(emb.shape, (9, 3))


if __name__ == "__main__":
  absltest.main()
