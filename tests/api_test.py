"""The Python API (fixclip_jax.load, Model, similarity): same features as the
embed CLI and a direct model call, from every kind of source (issue 16)."""
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np
from PIL import Image

import fixclip_jax
from fixclip_jax import api
from fixclip_jax import checkpoint
from fixclip_jax import convert
from fixclip_jax import embed
from fixclip_jax.data import tokenizers
from fixclip_jax.data import transforms
from fixclip_jax.models import clip
from fixclip_jax.models.sizes import get_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TEXTS = ["a photo of a red square", "two blue circles on a white table",
          "a very long caption " * 90]  # > 248 tokens: cut


def _fake_train_workdir(workdir, cfg, params_by_step):
  """A training WORKDIR as train.py leaves it: model_config.json + orbax train
  states (only the params matter to readers)."""
  checkpoint.write_workdir_model_config(workdir, cfg)
  manager = checkpoint.make_train_manager(workdir, keep=5)
  for step, params in params_by_step.items():
    checkpoint.save_train_state(manager, step, {"params": params,
                                                "step": np.int32(step)}, force=True)
  manager.wait_until_finished()
  manager.close()


class ApiTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    # Long-CLIP's 248-token two-table text and FIX-CLIP's prompts: the API
    # serves the trained models, not only plain CLIP.
    cls.cfg = get_config("tiny", context_length=248, positional_keep=20,
                         num_prompts=2, gta_groups=2)
    cls.params = jax.device_get(clip.init_params(cls.cfg, jax.random.PRNGKey(3)))
    cls.ckpt = os.path.join(cls.tmp, "model")
    checkpoint.save_model(cls.ckpt, cls.params, cls.cfg)
    rng = np.random.default_rng(0)
    cls.paths = []
    for i, (h, w) in enumerate([(40, 50), (64, 32), (32, 32), (50, 70), (33, 45)]):
      path = os.path.join(cls.tmp, f"im{i}.png")
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
      cls.paths.append(path)
    cls.model = fixclip_jax.load(cls.ckpt, batch_size=2)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _direct(self, params, cfg, texts, paths):
    """Normalised features of one direct model call on everything at once."""
    pixels = np.stack([transforms.clip_eval_transform(transforms.decode_image(p),
                                                      cfg.image_size) for p in paths])
    tokens = tokenizers.ClipTokenizer(context_length=cfg.context_length)(texts)
    out = clip.CLIP(cfg).apply({"params": params}, pixels, tokens)
    return (np.asarray(clip.normalize(out["image"]["embedding"])),
            np.asarray(clip.normalize(out["text"]["embedding"])))

  def test_features_equal_embed_and_a_direct_call(self):
    images = self.model.encode_image(self.paths)
    texts = self.model.encode_text(_TEXTS)
    self.assertEqual(images.shape, (5, 64))
    self.assertEqual(texts.shape, (3, 64))
    self.assertEqual(images.dtype, np.float32)
    ref = embed.embed(self.ckpt, _TEXTS, self.paths, batch_size=2)
    image_err = float(np.abs(images - ref["image_features"]).max())
    text_err = float(np.abs(texts - ref["text_features"]).max())
    print(f"API vs embed: max abs difference image {image_err:.1e}, text {text_err:.1e}")
    np.testing.assert_allclose(images, ref["image_features"], atol=1e-6)
    np.testing.assert_allclose(texts, ref["text_features"], atol=1e-6)
    image_ref, text_ref = self._direct(self.params, self.cfg, _TEXTS, self.paths)
    np.testing.assert_allclose(images, image_ref, atol=2e-6)
    np.testing.assert_allclose(texts, text_ref, atol=2e-6)
    # The rows are distinct (a wrong order would show).
    self.assertLess(float(images[0] @ images[1]), 0.999)

  def test_every_image_kind_gives_the_same_features(self):
    path = self.paths[0]
    pil = Image.open(path)
    uint8 = np.asarray(pil.convert("RGB"))
    pixels = self.model.preprocess(path)
    with open(path, "rb") as f:
      encoded = f.read()
    kinds = [path, pil, uint8, pixels, encoded, os.path.abspath(path)]
    feats = self.model.encode_image(kinds)
    for row, kind in zip(feats, kinds):
      np.testing.assert_allclose(row, feats[0], atol=1e-6, err_msg=type(kind).__name__)
    np.testing.assert_allclose(self.model.encode_image(path), feats[:1], atol=1e-6)
    np.testing.assert_allclose(self.model.encode_image(uint8[None]), feats[:1], atol=1e-6)

  def test_texts_are_cut_at_the_context_and_compiled_once(self):
    tokens = self.model.tokenize(_TEXTS[2])
    self.assertEqual(tokens.shape, (1, 248))
    self.assertEqual(tokens[0, -1], tokenizers.ClipTokenizer().eot_token_id)
    # A text only differing after token 248 has the same features.
    longer = self.model.encode_text([_TEXTS[2], _TEXTS[2] + " and a green star"])
    np.testing.assert_array_equal(longer[0], longer[1])
    # Calls of other lengths reuse the one compiled function per tower. The
    # jitted towers are shared by equal models (models/encoders.py), and other
    # tests may have compiled other shapes first: count what these calls add.
    compiled = self.model._text_fn._cache_size()
    for n in (1, 3, 4):
      self.model.encode_text(_TEXTS[:1] * n)
    self.assertEqual(self.model._text_fn._cache_size(), compiled)
    self.model.encode_image(self.paths[:1])
    compiled = self.model._image_fn._cache_size()
    self.model.encode_image(self.paths)
    self.assertEqual(self.model._image_fn._cache_size(), compiled)

  def test_similarity_and_zero_shot(self):
    images = self.model.encode_image(self.paths[:2])
    texts = self.model.encode_text(_TEXTS)
    scores = fixclip_jax.similarity(images, texts)
    self.assertEqual(scores.shape, (2, 3))
    np.testing.assert_allclose(scores, images @ texts.T, rtol=1e-6)
    probs = self.model.zero_shot(self.paths[:2], ["square", "circle", "star"],
                                 templates=("a photo of a {}.", "a {}"))
    self.assertEqual(probs.shape, (2, 3))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    classes = self.model.class_embeddings(["square"], ("a photo of a {}.", "a {}"))
    both = self.model.encode_text(["a photo of a square.", "a square"])
    mean = both.mean(0) / np.linalg.norm(both.mean(0))
    np.testing.assert_allclose(classes[0], mean, atol=1e-6)
    logits = self.model.logit_scale * images @ classes.T
    self.assertEqual(logits.shape, (2, 1))
    with self.assertRaisesRegex(ValueError, "no '{}'"):
      self.model.zero_shot(self.paths[:1], ["a"], templates=("a photo",))

  def test_training_workdir_latest_and_chosen_step(self):
    workdir = os.path.join(self.tmp, "run")
    later = jax.tree.map(lambda x: x + 0.01, self.params)
    _fake_train_workdir(workdir, self.cfg, {1: self.params, 2: later})
    latest = fixclip_jax.load(workdir)
    self.assertEqual(latest.format, "train_workdir")
    first = fixclip_jax.load(workdir, step=1)
    np.testing.assert_allclose(first.encode_text(_TEXTS), self.model.encode_text(_TEXTS),
                               atol=1e-6)
    self.assertGreater(np.abs(latest.encode_text(_TEXTS) -
                              first.encode_text(_TEXTS)).max(), 1e-4)
    # The embed CLI takes the workdir and --step too.
    texts = os.path.join(self.tmp, "texts.txt")
    with open(texts, "w") as f:
      f.write("\n".join(_TEXTS) + "\n")
    out = os.path.join(self.tmp, "features.npz")
    proc = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.embed", f"--checkpoint={workdir}",
         "--step=1", f"--texts={texts}", f"--out={out}", "--batch_size=2"],
        cwd=_ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn(f"Wrote {out}: 3 text and 0 image features", proc.stdout)
    with np.load(out) as npz:
      np.testing.assert_allclose(npz["text_features"], first.encode_text(_TEXTS),
                                 atol=1e-6)
    with self.assertRaisesRegex(FileNotFoundError, r"no saved step 7 \(saved steps: \[1, 2\]\)"):
      fixclip_jax.load(workdir, step=7)
    with self.assertRaisesRegex(ValueError, "needs a training workdir"):
      fixclip_jax.load(self.ckpt, step=1)

  def test_pytorch_file_and_hf_directory_sources(self):
    cfg = get_config("tiny")  # plain CLIP: what the HF layout holds
    params = jax.device_get(clip.init_params(cfg, jax.random.PRNGKey(4)))
    pt = os.path.join(self.tmp, "openai.safetensors")
    convert.save_openai(pt, params, cfg)
    hf = os.path.join(self.tmp, "hf")
    convert.save_hf(hf, params, cfg)
    image_ref, text_ref = self._direct(params, cfg, _TEXTS, self.paths)
    for source, fmt in ((pt, "openai"), (hf, "hf")):
      model = fixclip_jax.load(source)
      self.assertEqual(model.format, fmt)
      np.testing.assert_allclose(model.encode_image(self.paths), image_ref,
                                 atol=1e-5, err_msg=source)
      np.testing.assert_allclose(model.encode_text(_TEXTS), text_ref, atol=1e-5,
                                 err_msg=source)

  def test_bad_inputs_are_named(self):
    with self.assertRaisesRegex(FileNotFoundError, "nowhere"):
      fixclip_jax.load(os.path.join(self.tmp, "nowhere"))
    with self.assertRaisesRegex(FileNotFoundError, "missing.png"):
      self.model.encode_image([self.paths[0], os.path.join(self.tmp, "missing.png")])
    with self.assertRaisesRegex(ValueError, r"preprocessed pixels of shape \(32, 32, 3\)"):
      self.model.encode_image(np.zeros((10, 10, 3), np.float32))
    with self.assertRaisesRegex(ValueError, "batch_size"):
      api.Model(self.params, self.cfg, tokenizers.ClipTokenizer(context_length=248),
                batch_size=0)

  def test_top_level_import_is_light(self):
    code = ("import sys, fixclip_jax\n"
            "print(sorted(m for m in ('jax', 'orbax', 'grain', 'fixclip_jax.api') "
            "if m in sys.modules))\n"
            "fixclip_jax.load\n"
            "print('fixclip_jax.api' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=_ROOT,
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(proc.stdout.split("\n")[:2], ["[]", "True"])


if __name__ == "__main__":
  absltest.main()
