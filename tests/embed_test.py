"""Tests for fixclip_jax.embed: features from a checkpoint, in order, normalised."""
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np
from PIL import Image
import sentencepiece

from fixclip_jax import checkpoint
from fixclip_jax import embed
from fixclip_jax.data import tokenizers
from fixclip_jax.data import transforms
from fixclip_jax.models import clip
from fixclip_jax.models.sizes import get_config

_TEXTS = ["a photo of a red square", "two blue circles on a white table",
          "a long caption " * 30]  # longer than 77 tokens: truncated


class EmbedTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.cfg = get_config("tiny")
    cls.params = jax.device_get(clip.init_params(cls.cfg, jax.random.PRNGKey(1)))
    cls.ckpt = os.path.join(cls.tmp, "ckpt")
    checkpoint.save_model(cls.ckpt, cls.params, cls.cfg)
    cls.image_dir = os.path.join(cls.tmp, "images")
    os.makedirs(cls.image_dir)
    rng = np.random.default_rng(0)
    # Different sizes and aspect ratios; "b_broken.png" sorts between them.
    for name, (h, w) in [("a.png", (40, 50)), ("c.png", (64, 32)), ("d.png", (32, 32))]:
      pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(cls.image_dir, name))
    with open(os.path.join(cls.image_dir, "b_broken.png"), "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    with open(os.path.join(cls.image_dir, "notes.txt"), "w") as f:
      f.write("not an image file, not listed")
    cls.text_file = os.path.join(cls.tmp, "texts.txt")
    with open(cls.text_file, "w") as f:
      f.write("\n".join(_TEXTS[:2]) + "\n\n" + _TEXTS[2] + "\n")

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _direct(self, texts, paths):
    """Features from one direct model call on everything at once."""
    model = clip.CLIP(self.cfg)
    pixels = np.stack([transforms.clip_eval_transform(transforms.decode_image(p), 32)
                       for p in paths])
    tokens = tokenizers.ClipTokenizer(context_length=77)(texts)
    out = model.apply({"params": self.params}, pixels, tokens)
    return (np.asarray(clip.normalize(out["text"]["embedding"])),
            np.asarray(clip.normalize(out["image"]["embedding"])))

  def test_embed_skips_unreadable_and_matches_model(self):
    paths = embed.list_images(self.image_dir)
    self.assertEqual([os.path.basename(p) for p in paths],
                     ["a.png", "b_broken.png", "c.png", "d.png"])
    texts = embed.read_texts(self.text_file)
    self.assertEqual(texts, _TEXTS)
    # batch_size 2: 3 texts and 3 readable images each end in a padded batch.
    result = embed.embed(self.ckpt, texts, paths, batch_size=2)

    good = [p for p in paths if "broken" not in p]
    self.assertEqual(result["text_features"].shape, (3, 64))
    self.assertEqual(result["image_features"].shape, (3, 64))
    self.assertEqual(result["text_features"].dtype, np.float32)
    self.assertEqual(list(result["texts"]), _TEXTS)
    self.assertEqual(list(result["image_paths"]), good)
    self.assertEqual(list(result["skipped_images"]), [paths[1]])
    for key in ("text_features", "image_features"):
      np.testing.assert_allclose(np.linalg.norm(result[key], axis=-1), 1.0, atol=1e-5)

    text_ref, image_ref = self._direct(texts, good)
    np.testing.assert_allclose(result["text_features"], text_ref, atol=2e-6)
    np.testing.assert_allclose(result["image_features"], image_ref, atol=2e-6)
    # The rows are not all the same vector (order would be untestable).
    self.assertLess(float(result["image_features"][0] @ result["image_features"][1]), 0.999)

  def test_texts_only(self):
    result = embed.embed(self.ckpt, _TEXTS[:1], [], batch_size=4)
    self.assertEqual(result["text_features"].shape, (1, 64))
    self.assertEqual(result["image_features"].shape, (0, 64))
    self.assertEqual(result["skipped_images"].shape, (0,))

  def test_cli_writes_npz(self):
    out = os.path.join(self.tmp, "features.npz")
    proc = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.embed", f"--checkpoint={self.ckpt}",
         f"--texts={self.text_file}", f"--images={self.image_dir}/*.png",
         f"--out={out}", "--batch_size=2"],
        capture_output=True, text=True, check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("Skipping unreadable image", proc.stderr)
    with np.load(out) as npz:
      self.assertEqual(sorted(npz.files), ["image_features", "image_paths",
                                           "skipped_images", "text_features", "texts",
                                           "texts_cut"])
      self.assertEqual(npz["image_features"].shape, (3, 64))
      self.assertEqual(list(npz["texts"]), _TEXTS)
      self.assertEqual([os.path.basename(p) for p in npz["skipped_images"]],
                       ["b_broken.png"])
    self.assertEqual([n for n in os.listdir(self.tmp) if n.startswith(".")], [])

  def test_sentencepiece_tokenizer(self):
    prefix = os.path.join(self.tmp, "spm")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TEXTS * 20), model_prefix=prefix,
        vocab_size=40, minloglevel=2, hard_vocab_limit=False)
    sp = tokenizers.get_tokenizer(prefix + ".model", context_length=77)
    cfg = self.cfg.replace(vocab_size=sp.vocab_size,
                           eot_token_id=sp.eot_token_id)
    params = jax.device_get(clip.init_params(cfg, jax.random.PRNGKey(2)))
    ckpt = os.path.join(self.tmp, "ckpt_sp")
    checkpoint.save_model(ckpt, params, cfg)
    result = embed.embed(ckpt, _TEXTS, [], batch_size=2,
                         tokenizer=prefix + ".model")
    out = clip.CLIP(cfg).apply({"params": params}, sp(_TEXTS),
                               method=clip.CLIP.encode_text)
    np.testing.assert_allclose(result["text_features"],
                               clip.normalize(out["embedding"]), atol=2e-6)
    # The CLIP-vocabulary model pools at argmax: a SentencePiece eos is not it.
    with self.assertRaisesRegex(ValueError, r"ckpt with tokenizer .*spm\.model"
                                r".*eot_token_id="):
      embed.embed(self.ckpt, _TEXTS, [], tokenizer=prefix + ".model")
    with self.assertRaisesRegex(ValueError, r"config\.data\.tokenizer='bpe'"):
      embed.embed(self.ckpt, _TEXTS, [], tokenizer="bpe")

  def test_missing_checkpoint_is_named(self):
    with self.assertRaisesRegex(FileNotFoundError, "nowhere"):
      embed.embed(os.path.join(self.tmp, "nowhere"), ["x"], [])


if __name__ == "__main__":
  absltest.main()
