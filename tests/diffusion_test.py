"""fixclip_jax.diffusion on tiny randomly initialised SD 1.x and SDXL pipelines
(CPU, no hub): words past token 77 change the prompt embeddings and the image;
the embeddings are diffusers' own where diffusers can compute them (issue 25
item 2).

References: SD 1.x, the pipeline's own `encode_prompt` with the 248-token
tokenizer (one encoder: it works there); SDXL, diffusers' `encode_prompt` of a
pipeline whose long tokenizer reads 77 tokens (what SDXL can do without us):
the first 76 rows of the long half (row 76 is the cut prompt's end token), the
whole first chunk of the second half, and the pooled embedding.
"""
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
from fixclip_jax import diffusion
from fixclip_jax.data import tokenizers
from fixclip_jax.models import clip
from fixclip_jax.models import sizes

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORDS = ("red blue green circle square star large small top bottom left right "
          "middle corner white background shape next to above below").split()
_SECOND_WIDTH = 32  # the tiny "OpenCLIP-bigG"
_TIME_DIM = 8


def _prompt(seed: int, words: int) -> str:
  return " ".join(np.random.default_rng(seed).choice(_WORDS, words))


def _vae():
  return diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
      down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, sample_size=16)


def _unet(cross_attention_dim: int, sdxl: bool):
  extra = {}
  if sdxl:  # SDXL's micro-conditioning: 6 time ids + the pooled text
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=_TIME_DIM,
                 projection_class_embeddings_input_dim=6 * _TIME_DIM + _SECOND_WIDTH,
                 use_linear_projection=True)
  return diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
      block_out_channels=(32, 64), norm_num_groups=32,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=cross_attention_dim, attention_head_dim=8, **extra)


def _image(pipe, kwargs) -> np.ndarray:
  return pipe(**kwargs, num_inference_steps=2, height=32, width=32,
              generator=torch.Generator().manual_seed(0), output_type="np").images


class DiffusionTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    torch.manual_seed(0)
    # Our tiny Long-CLIP model (two position tables, 248 tokens), 128 wide,
    # exported as convert --to=hf_text does.
    cfg = sizes.get_config("tiny", context_length=248, positional_keep=20)
    params = jax.device_get(clip.init_params(cfg, jax.random.PRNGKey(5)))
    te248 = os.path.join(cls.tmp, "te248")
    convert.save_hf_text_encoder(te248, params, cfg)
    cls.encoder, cls.tokenizer = diffusion.load_text_encoder(te248)
    cls.width = cfg.text_width
    tok77 = os.path.join(cls.tmp, "tok77")
    tokenizers.ClipTokenizer(context_length=77).save_hf_files(tok77)
    cls.tokenizer77 = transformers.CLIPTokenizer.from_pretrained(tok77)
    scheduler = diffusers.DDIMScheduler(steps_offset=1, clip_sample=False)
    cls.sd = diffusers.StableDiffusionPipeline(
        vae=_vae(), text_encoder=cls.encoder, tokenizer=cls.tokenizer,
        unet=_unet(cls.width, sdxl=False), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    second = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=_SECOND_WIDTH, intermediate_size=64, projection_dim=_SECOND_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    parts = dict(vae=_vae(), text_encoder_2=second.eval(), tokenizer_2=cls.tokenizer77,
                 unet=_unet(cls.width + _SECOND_WIDTH, sdxl=True), scheduler=scheduler)
    cls.sdxl = diffusers.StableDiffusionXLPipeline(
        text_encoder=cls.encoder, tokenizer=cls.tokenizer, **parts)
    # What SDXL does without us: the long encoder read through 77 tokens.
    cls.sdxl77 = diffusers.StableDiffusionXLPipeline(
        text_encoder=cls.encoder, tokenizer=cls.tokenizer77, **parts)
    for pipe in (cls.sd, cls.sdxl, cls.sdxl77):
      pipe.set_progress_bar_config(disable=True)
    head = _prompt(0, 90)  # past 77 tokens on its own
    cls.prompts = [head + " " + _prompt(1, 110), head + " " + _prompt(2, 110)]
    ids = tokenizers.ClipTokenizer(context_length=248)(cls.prompts)
    cls.first_diff = int(np.argmax(ids[0] != ids[1]))
    cls.num_tokens = int((ids[0] != 0).sum())

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_prompts_differ_only_past_token_77(self):
    self.assertGreater(self.first_diff, 77)
    self.assertBetween(self.num_tokens, 200, 248)  # not cut at 248
    cut77 = [self.tokenizer77(p, padding="max_length", truncation=True,
                              max_length=77)["input_ids"] for p in self.prompts]
    self.assertEqual(cut77[0], cut77[1])

  def test_sd_long_prompt_embeddings_and_image(self):
    start = time.time()
    a, b = (diffusion.prompt_embeds(self.sd, p) for p in self.prompts)
    self.assertEqual(tuple(a["prompt_embeds"].shape), (1, 248, self.width))
    self.assertEqual(set(a), {"prompt_embeds", "negative_prompt_embeds"})
    # diffusers' own encoding (the 248-token tokenizer suffices for SD 1.x).
    with torch.no_grad():
      ref, ref_negative = self.sd.encode_prompt(self.prompts[0], "cpu", 1, True)
    torch.testing.assert_close(a["prompt_embeds"], ref)
    torch.testing.assert_close(a["negative_prompt_embeds"], ref_negative)
    ea, eb = a["prompt_embeds"][0].numpy(), b["prompt_embeds"][0].numpy()
    # Causal attention: rows before the first differing token are equal.
    np.testing.assert_array_equal(ea[:self.first_diff], eb[:self.first_diff])
    change = float(np.abs(ea[self.first_diff:] - eb[self.first_diff:]).max())
    self.assertGreater(change, 1e-3)
    images = [_image(self.sd, kw) for kw in (a, b, a)]
    np.testing.assert_array_equal(images[0], images[2])  # deterministic
    image_change = float(np.abs(images[0] - images[1]).max())
    self.assertGreater(image_change, 1e-4)
    print(f"[diffusion SD 1.x] {self.num_tokens}-token prompts differing from "
          f"token {self.first_diff}: prompt_embeds {tuple(ea.shape)}, rows >= "
          f"{self.first_diff} change by up to {change:.3f}, image pixels by up "
          f"to {image_change:.4f}; {time.time() - start:.1f} s")

  def test_sdxl_long_prompt_embeddings_and_image(self):
    start = time.time()
    a, b = (diffusion.prompt_embeds(self.sdxl, p) for p in self.prompts)
    width = self.width + _SECOND_WIDTH
    self.assertEqual(tuple(a["prompt_embeds"].shape), (1, 248, width))
    self.assertEqual(tuple(a["pooled_prompt_embeds"].shape), (1, _SECOND_WIDTH))
    # The base model's empty negative prompt is zeros, as in diffusers.
    self.assertEqual(float(a["negative_prompt_embeds"].abs().max()), 0.0)
    self.assertEqual(float(a["negative_pooled_prompt_embeds"].abs().max()), 0.0)
    # Where SDXL can read the prompt (77 tokens), diffusers' own numbers.
    with torch.no_grad():
      ref, _, ref_pooled, _ = self.sdxl77.encode_prompt(
          self.prompts[0], device="cpu", num_images_per_prompt=1,
          do_classifier_free_guidance=False)
    self.assertEqual(tuple(ref.shape), (1, 77, width))
    ours = a["prompt_embeds"]
    torch.testing.assert_close(ours[:, :76, :self.width], ref[:, :76, :self.width])
    torch.testing.assert_close(ours[:, :77, self.width:], ref[:, :, self.width:])
    torch.testing.assert_close(a["pooled_prompt_embeds"], ref_pooled)
    # Past token 77 both halves see the rest of the prompt.
    ea, eb = a["prompt_embeds"][0].numpy(), b["prompt_embeds"][0].numpy()
    long_a, long_b = ea[:, :self.width], eb[:, :self.width]
    np.testing.assert_array_equal(long_a[:self.first_diff], long_b[:self.first_diff])
    long_change = float(np.abs(long_a[self.first_diff:] - long_b[self.first_diff:]).max())
    self.assertGreater(long_change, 1e-3)
    # The second encoder's chunk holding the first difference (rows of 77).
    chunk = self.first_diff // 77 * 77
    second_a, second_b = ea[:, self.width:], eb[:, self.width:]
    np.testing.assert_array_equal(second_a[:chunk], second_b[:chunk])
    second_change = float(np.abs(second_a[chunk:] - second_b[chunk:]).max())
    self.assertGreater(second_change, 1e-3)
    images = [_image(self.sdxl, kw) for kw in (a, b)]
    image_change = float(np.abs(images[0] - images[1]).max())
    self.assertGreater(image_change, 1e-4)
    print(f"[diffusion SDXL] prompt_embeds {tuple(ea.shape)} = long CLIP "
          f"{self.width} + second encoder {_SECOND_WIDTH} in 77-token chunks; "
          f"past token 77 the long half changes by up to {long_change:.3f}, "
          f"the second by {second_change:.3f}, the image by {image_change:.4f}; "
          f"{time.time() - start:.1f} s")

  def test_command_line_sdxl_and_a_width_mismatch(self):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (_REPO, os.environ.get("PYTHONPATH")) if p))
    sdxl_dir = os.path.join(self.tmp, "sdxl_tiny")
    self.sdxl.save_pretrained(sdxl_dir)
    te248 = os.path.join(self.tmp, "te248")
    out = os.path.join(self.tmp, "sdxl.png")
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "fixclip_jax.diffusion", *args], cwd=self.tmp,
        env=env, capture_output=True, text=True, timeout=600)
    proc = run(f"--text_encoder={te248}", f"--pipeline={sdxl_dir}",
               f"--prompt={self.prompts[0]}", f"--out={out}", "--device=cpu",
               "--steps=2", "--height=32", "--width=32")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn(f"StableDiffusionXLPipeline: the prompt's {self.num_tokens} "
                  f"tokens (of 248) reach the UNet as prompt_embeds (1, 248, "
                  f"{self.width + _SECOND_WIDTH})", proc.stdout)
    self.assertIn(f"Wrote {out}", proc.stdout)
    self.assertGreater(os.path.getsize(out), 100)
    self.assertEqual(proc.stderr.strip(), "")  # a quiet console
    print(f"[diffusion CLI] {proc.stdout.strip()}")
    # A text tower narrower than the pipeline's CLIP-L: one line, exit 2.
    cfg = sizes.get_config("tiny", context_length=248, positional_keep=20,
                           text_width=64)
    narrow = os.path.join(self.tmp, "te248_narrow")
    convert.save_hf_text_encoder(narrow, jax.device_get(
        clip.init_params(cfg, jax.random.PRNGKey(6))), cfg)
    proc = run(f"--text_encoder={narrow}", f"--pipeline={sdxl_dir}",
               "--prompt=a cat", "--device=cpu")
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    self.assertIn(f"the text features are 96 wide but the UNet of {sdxl_dir} "
                  "cross-attends 160-wide ones", proc.stderr)
    self.assertLen(proc.stderr.strip().splitlines(), 1, proc.stderr)

  def test_chunks_cover_the_rows(self):
    chunks = diffusion.chunk_ids(self.tokenizer77, self.prompts[0], 248)
    self.assertLen(chunks, 4)                       # 4 x 77 >= 248 rows
    ids = self.tokenizer77(self.prompts[0], add_special_tokens=False)["input_ids"]
    content = [i for c in chunks for i in c if i not in (49406, 49407)]
    self.assertEqual(content, ids[:4 * 75])
    self.assertTrue(all(len(c) == 77 and c[0] == 49406 for c in chunks))


if __name__ == "__main__":
  absltest.main()
