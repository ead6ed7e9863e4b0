"""examples/diffusion_plug_and_play.py for real, on a tiny randomly initialised
StableDiffusionPipeline (CPU): our 248-token text encoder replaces the 77-token
one, words after token 77 reach the UNet, a width mismatch is refused with one
line (issue 16)."""
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import diffusers
import jax
import numpy as np
import torch
import transformers

from fixclip_jax import convert
from fixclip_jax.data import tokenizers
from fixclip_jax.models import clip
from fixclip_jax.models import sizes

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXAMPLE = os.path.join(_ROOT, "examples", "diffusion_plug_and_play.py")
_WORDS = ("red blue green circle square star large small top bottom left right "
          "middle corner white background shape next to above below").split()


def _prompt(seed: int, words: int) -> str:
  rng = np.random.default_rng(seed)
  return " ".join(rng.choice(_WORDS, words))


def _tiny_pipeline(directory: str, cross_attention_dim: int) -> None:
  """A random StableDiffusionPipeline of a few hundred kB, with its own
  77-token text encoder (what ours replaces)."""
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
      block_out_channels=(32, 64), norm_num_groups=32,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=cross_attention_dim, attention_head_dim=8)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
      down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, sample_size=16)
  text_config = transformers.CLIPTextConfig(
      hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77)
  text_encoder = transformers.CLIPTextModel(text_config)
  tok_dir = os.path.join(directory + "_tok77")
  tokenizers.ClipTokenizer(context_length=77).save_hf_files(tok_dir)
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder,
      tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dir), unet=unet,
      scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(directory)


class DiffusionExampleTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    # Our tiny model's text tower is 128 wide, 248 tokens (Long-CLIP's tables).
    cfg = sizes.get_config("tiny", context_length=248, positional_keep=20)
    params = jax.device_get(clip.init_params(cfg, jax.random.PRNGKey(5)))
    cls.text_encoder = os.path.join(cls.tmp, "te248")
    convert.save_hf_text_encoder(cls.text_encoder, params, cfg)
    cls.pipeline = os.path.join(cls.tmp, "sd_tiny")
    _tiny_pipeline(cls.pipeline, cross_attention_dim=cfg.text_width)
    cls.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _run(self, *args):
    return subprocess.run([sys.executable, _EXAMPLE, *args], cwd=self.tmp,
                          env=self.env, capture_output=True, text=True, timeout=300)

  def test_words_after_token_77_change_the_prompt_embeddings(self):
    start = time.time()
    head = _prompt(0, 90)  # well past 77 tokens on its own
    prompts = {"a": head + " " + _prompt(1, 110), "b": head + " " + _prompt(2, 110)}
    outputs = {}
    for name, prompt in prompts.items():
      out = os.path.join(self.tmp, f"{name}.png")
      emb = os.path.join(self.tmp, f"{name}.npy")
      proc = self._run(f"--text_encoder={self.text_encoder}",
                       f"--pipeline={self.pipeline}", f"--prompt={prompt}",
                       f"--out={out}", "--device=cpu", "--dtype=float32",
                       "--steps=2", "--height=32", "--width=32",
                       f"--save_embeddings={emb}")
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      self.assertIn(f"wrote {out}", proc.stdout)
      self.assertGreater(os.path.getsize(out), 100)
      outputs[name] = np.load(emb)
      count = int(proc.stdout.split("prompt: ")[1].split(" tokens")[0])
      self.assertBetween(count, 200, 248)  # a 200-token prompt, not cut at 248
    a, b = outputs["a"], outputs["b"]
    self.assertEqual(a.shape, (248, 128))
    ids = tokenizers.ClipTokenizer(context_length=248)(list(prompts.values()))
    first_diff = int(np.argmax(ids[0] != ids[1]))
    self.assertGreater(first_diff, 77)
    # Causal attention: rows before the first differing token are equal; the
    # words after token 77 change the rows from there on.
    np.testing.assert_array_equal(a[:first_diff], b[:first_diff])
    change = float(np.abs(a[first_diff:] - b[first_diff:]).max())
    self.assertGreater(change, 1e-3)
    # A 77-token tokenizer (the pipeline's own) cannot tell the prompts apart.
    tok77 = transformers.CLIPTokenizer.from_pretrained(
        os.path.join(self.pipeline, "tokenizer"))
    ids77 = [tok77(p, padding="max_length", truncation=True, max_length=77)["input_ids"]
             for p in prompts.values()]
    self.assertEqual(ids77[0], ids77[1])
    print(f"[diffusion example] 200+-token prompts differing from token "
          f"{first_diff}: prompt embedding rows >= {first_diff} change by up to "
          f"{change:.3f}; two runs took {time.time() - start:.1f} s")

  def test_width_mismatch_is_one_clear_line(self):
    narrow = os.path.join(self.tmp, "sd_96")
    _tiny_pipeline(narrow, cross_attention_dim=96)
    proc = self._run(f"--text_encoder={self.text_encoder}", f"--pipeline={narrow}",
                     "--prompt=a cat", "--device=cpu")
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    self.assertIn("is 128 wide but the UNet", proc.stderr)
    self.assertIn("cross-attends 96-wide", proc.stderr)
    self.assertIn("B/16's text tower is 512 wide", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
  absltest.main()
