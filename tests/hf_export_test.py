"""`convert --to=hf`: a directory transformers' CLIPModel, CLIPProcessor,
CLIPTokenizer and CLIPTokenizerFast load, with our features and, after
`tokenizers.normalize_text`, our token ids (issue 16)."""
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np
from PIL import Image
import torch
import transformers

from fixclip_jax import convert
from fixclip_jax.data import tokenizers
from fixclip_jax.data import transforms
from fixclip_jax.models import clip
from fixclip_jax.models import sizes

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONTEXT = 248

# Captions, each rewritten with text that HF's tokenizers normalise differently
# from ours (ftfy + HTML unescape): entities, curly quotes, emoji, control and
# format characters, case, mojibake, ligatures, full-width forms, NFD accents,
# Unicode spaces, scripts, and text longer than the context.
_BASES = [
    "A photo of a cat and a dog sitting on a red sofa",
    "Two people are walking along the beach at sunset, holding hands",
    "A close-up of a bowl of ramen with an egg, scallions and pork",
    "The street sign says 'No Parking' in white letters on blue",
    "An old man's hat lies on the bench next to a newspaper",
    "Children playing football in the park while it's raining",
    "A red circle at the top left of a large blue square",
    "Cafe menu: coffee 3.50, tea 2.80 & croissant 1.90",
    "A diagram showing the process of photosynthesis in plants",
    "Snow-covered mountains reflected in a calm lake",
]
_VARIANTS = [
    lambda s: s,
    lambda s: s.replace(" and ", " &amp; "),
    lambda s: "&lt;b&gt;" + s + "&lt;/b&gt;",
    lambda s: s.replace("'", "&#39;") + " &quot;quoted&quot;",
    lambda s: s + " &amp;amp; more&nbsp;text",
    lambda s: "caf&eacute; " + s + " &copy; 2024",
    lambda s: "\u201c" + s + "\u201d \u2014 it\u2019s \u2018nice\u2019\u2026",
    lambda s: s + " \U0001F431\U0001F436 \U0001F308\U0001F469\u200d\U0001F469"
                  "\u200d\U0001F467 \U0001F1EB\U0001F1F7",
    lambda s: s.replace(" ", "\t", 2) + "\r\n" + s[:20] + "\x0b",
    lambda s: "\x1b[31m" + s + "\x1b[0m",
    lambda s: s + "\x00\x07\x7f end",
    lambda s: "\ufeff" + s.replace(" ", "\u200b", 1),
    lambda s: s.upper(),
    lambda s: "".join(c.upper() if i % 3 else c for i, c in enumerate(s)),
    lambda s: s + " \u0130stanbul STRASSE stra\u00dfe \u03a3\u039f\u03a6\u039f\u03a3",
    lambda s: " ".join([s] * 12),  # longer than 248 tokens: cut
    lambda s: s.replace("e", "\u00c3\u00a9", 2),  # mojibake of "é"
    lambda s: "\u00e2\u20ac\u0153mojibake\u00e2\u20ac\u009d " + s,
    lambda s: "\ufb01sh \ufb02ower " + s + " \uff21\uff22\uff23\uff11\uff12\uff13 x\u00b2 \u00bd",
    lambda s: "cafe\u0301 nai\u0308ve " + s,
    lambda s: s.replace(" ", "\u00a0", 2).replace(" ", "\u3000", 1) + "\u2003end",
    lambda s: s + " \u732b\u3068\u72ac \u0642\u0637\u0629 \u092c\u093f\u0932\u094d"
                  "\u0932\u0940 \ud55c\uad6d\uc5b4",
    lambda s: "  " + s + "   \n\n  ",
    lambda s: s + " 12,345.67 $100 50% #tag @user http://x.co/a?b=c",
    lambda s: s.replace("a", "\u0430", 3),  # Cyrillic a
    lambda s: s + " &#x1F600; &#128512; &unknownentity; & alone",
    lambda s: s + " \u2028line\u2029para\x85next",
    lambda s: s + " \x1c\x1d\x1e\x1f separators",
    lambda s: "<p>" + s + "</p> <br/>",
    lambda s: s.replace(" ", "  ") + " \u00ad soft\u00adhyphen",
]
LINES = [variant(base) for base in _BASES for variant in _VARIANTS]


def _rows_agree(ours: np.ndarray, theirs: np.ndarray, eot: int) -> np.ndarray:
  """[N] bool: rows equal up to and including our first EOT (we pad with 0,
  HF with EOT)."""
  ends = (ours == eot).argmax(1)
  return np.array([np.array_equal(ours[i, :n + 1], theirs[i, :n + 1])
                   for i, n in enumerate(ends)])


class HFExportTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    torch.set_grad_enabled(False)
    cls.addClassCleanup(torch.set_grad_enabled, True)
    cls.tmp = tempfile.mkdtemp()
    # A Long-CLIP-style model (248 tokens, two position tables) as training
    # leaves it; HF gets the tables folded into one.
    cls.cfg = sizes.get_config("tiny", context_length=_CONTEXT, positional_keep=20)
    params = jax.device_get(clip.init_params(cls.cfg, jax.random.PRNGKey(11)))
    params["text"]["positional_embedding_res"] = (  # a wrong fold would show
        params["text"]["positional_embedding_res"] + 0.05)
    cls.params = params
    cls.hf_dir = os.path.join(cls.tmp, "hf")
    convert.save_hf(cls.hf_dir, params, cls.cfg)
    cls.tok = tokenizers.ClipTokenizer(context_length=_CONTEXT)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _ours(self, pixels, ids):
    out = clip.CLIP(self.cfg).apply({"params": self.params}, pixels, ids)
    return (np.asarray(clip.normalize(out["image"]["embedding"])),
            np.asarray(clip.normalize(out["text"]["embedding"])))

  def test_files_and_sizes(self):
    self.assertSameElements(os.listdir(self.hf_dir), [
        "config.json", "model.safetensors", "vocab.json", "merges.txt",
        "tokenizer_config.json", "special_tokens_map.json",
        "preprocessor_config.json"])
    config = transformers.CLIPConfig.from_pretrained(self.hf_dir)
    self.assertEqual(config.text_config.max_position_embeddings, _CONTEXT)
    for cls in (transformers.CLIPTokenizer, transformers.CLIPTokenizerFast):
      self.assertEqual(cls.from_pretrained(self.hf_dir).model_max_length, _CONTEXT)
    processor = transformers.CLIPProcessor.from_pretrained(self.hf_dir)
    self.assertEqual(processor.tokenizer.model_max_length, _CONTEXT)
    self.assertEqual(processor.image_processor.crop_size,
                     {"height": self.cfg.image_size, "width": self.cfg.image_size})
    # Files and folders get the usual modes (umask 022: 0644 / 0755).
    umask = os.umask(0)
    os.umask(umask)
    self.assertEqual(os.stat(self.hf_dir).st_mode & 0o777, 0o777 & ~umask)
    for name in os.listdir(self.hf_dir):
      mode = os.stat(os.path.join(self.hf_dir, name)).st_mode & 0o777
      self.assertEqual(mode, 0o666 & ~umask, name)

  def test_model_and_processor_features_equal_ours(self):
    model = transformers.CLIPModel.from_pretrained(self.hf_dir).eval()
    rng = np.random.default_rng(0)
    # Raw images of several sizes; the texts cover short, cut and odd ones.
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((32, 32), (50, 70), (90, 40))]
    texts = [LINES[0], LINES[15], LINES[6]]
    pixels = np.stack([transforms.clip_eval_transform(im, self.cfg.image_size)
                       for im in images])
    ours_image, ours_text = self._ours(pixels, self.tok(texts))

    kwargs = {"backend": "pil"} if transformers.__version__ >= "5" else {}
    processor = transformers.CLIPProcessor.from_pretrained(self.hf_dir, **kwargs)
    inputs = processor(text=[tokenizers.normalize_text(t) for t in texts],
                       images=images, padding="max_length", truncation=True,
                       return_tensors="pt")
    hf_pixels = inputs["pixel_values"].numpy().transpose(0, 2, 3, 1)
    pixel_err = float(np.abs(hf_pixels - pixels).max())
    out = model(**inputs)
    hf_image = out.image_embeds.numpy()  # normalised by CLIPModel
    hf_text = out.text_embeds.numpy()
    image_err = float(np.abs(hf_image - ours_image).max())
    text_err = float(np.abs(hf_text - ours_text).max())
    print(f"[hf export] CLIPProcessor ({type(processor.image_processor).__name__}) "
          f"pixels max abs diff {pixel_err:.1e}; CLIPModel features max abs diff: "
          f"image {image_err:.1e}, text {text_err:.1e}")
    self.assertLess(pixel_err, 1e-5)
    self.assertLess(image_err, 1e-5)
    self.assertLess(text_err, 1e-5)

    # The default (torchvision) image processor resizes with its own bicubic
    # filter: close to ours, not equal, on images it has to resize.
    default = transformers.CLIPProcessor.from_pretrained(self.hf_dir)
    default_pixels = default(images=images, return_tensors="np")["pixel_values"]
    print(f"[hf export] default {type(default.image_processor).__name__} pixels "
          f"max abs diff {np.abs(default_pixels.transpose(0, 2, 3, 1) - pixels).max():.1e}"
          f" (the 32x32 image, not resized: "
          f"{np.abs(default_pixels[0].transpose(1, 2, 0) - pixels[0]).max():.1e})")
    np.testing.assert_allclose(default_pixels[0].transpose(1, 2, 0), pixels[0], atol=1e-5)

  def test_normalize_text_makes_hf_ids_ours(self):
    ours = self.tok(LINES)
    fast = transformers.CLIPTokenizerFast.from_pretrained(self.hf_dir)
    slow = transformers.CLIPTokenizer.from_pretrained(self.hf_dir)
    counts = {}
    for name, hf in (("CLIPTokenizerFast", fast), ("CLIPTokenizer", slow)):
      encode = lambda lines: hf(lines, padding="max_length", truncation=True,
                                max_length=_CONTEXT, return_tensors="np")["input_ids"]
      raw = _rows_agree(ours, encode(LINES), self.tok.eot_token_id)
      normalized = _rows_agree(
          ours, encode([tokenizers.normalize_text(t) for t in LINES]),
          self.tok.eot_token_id)
      counts[name] = (int(raw.sum()), int(normalized.sum()))
      print(f"[hf export] {name}: ids equal to ours on {raw.sum()}/{len(LINES)} "
            f"lines as they are, {normalized.sum()}/{len(LINES)} after normalize_text")
      self.assertEqual(int(normalized.sum()), len(LINES),
                       [LINES[i] for i in np.flatnonzero(~normalized)][:3])
    # The lines do exercise the difference.
    self.assertLess(counts["CLIPTokenizerFast"][0], len(LINES) * 0.8)

  def test_cli_writes_hf_and_hf_text(self):
    src = os.path.join(self.tmp, "src.safetensors")
    convert.save_openai(src, self.params, self.cfg)
    umask = os.umask(0)
    os.umask(umask)
    self.assertEqual(os.stat(src).st_mode & 0o777, 0o666 & ~umask)  # not 0600
    for to in ("hf", "hf_text"):
      dst = os.path.join(self.tmp, f"cli_{to}")
      proc = subprocess.run(
          [sys.executable, "-m", "fixclip_jax.convert", f"--src={src}",
           f"--dst={dst}", f"--to={to}"], cwd=_ROOT, capture_output=True,
          text=True, timeout=300)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      self.assertIn(f"Wrote {dst} ({to})", proc.stdout)
      # No INFO logs on the console (absl's lines start "I<month><day> ").
      self.assertNotRegex(proc.stderr, r"(?m)^I\d{4} ")
      tok = transformers.CLIPTokenizerFast.from_pretrained(dst)
      self.assertEqual(tok.model_max_length, _CONTEXT)
    text = transformers.CLIPTextModelWithProjection.from_pretrained(
        os.path.join(self.tmp, "cli_hf_text")).eval()
    ids = self.tok(LINES[:3])
    _, ours_text = self._ours(np.zeros((3, 32, 32, 3), np.float32), ids)
    embeds = text(torch.from_numpy(ids.astype(np.int64))).text_embeds.numpy()
    embeds /= np.linalg.norm(embeds, axis=-1, keepdims=True)
    np.testing.assert_allclose(embeds, ours_text, atol=1e-5)

  def test_cli_errors_are_one_line(self):
    missing = os.path.join(self.tmp, "missing.pt")
    proc = subprocess.run([sys.executable, "-m", "fixclip_jax.convert",
                           f"--src={missing}", f"--dst={self.tmp}/x", "--to=hf"],
                          cwd=_ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 2)
    self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
    self.assertIn(f"--src={missing}: no such file or directory", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)
    # The flag that brings the traceback back.
    proc = subprocess.run([sys.executable, "-m", "fixclip_jax.convert", "--debug",
                           f"--src={missing}", f"--dst={self.tmp}/x"],
                          cwd=_ROOT, capture_output=True, text=True, timeout=300)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("Traceback", proc.stderr)


if __name__ == "__main__":
  absltest.main()
