"""Forward parity of our Flax CLIP with open_clip and Hugging Face (method.md §1).

Random-init PyTorch models (no weights are available offline) are converted
with fixclip_jax.convert and run on the same random images and realistic token
ids (SOT, random ids, EOT=49407, zero padding) in float32 on both sides. Every
parameter is perturbed first, so LayerNorm scales/biases and attention biases
are not at their trivial init values and a mix-up of any tensor shows.

Measured relative errors ||ours - ref|| / ||ref|| over the batch are printed
(run with `pytest -s` to see them).
"""
import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import open_clip
import torch
import transformers

from fixclip_jax import layouts
from fixclip_jax import loader
from fixclip_jax.models import clip

_SOT, _EOT = 49406, 49407
_TOL = 1e-4


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.02):
  """Adds N(0, scale^2) noise to every parameter (in place)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      if p.dim() > 0:
        p.add_(torch.randn(p.shape, generator=gen) * scale)


def _token_ids(rng, lengths, context_length):
  """[B, C] int64: SOT, len random ids, EOT, zero padding."""
  ids = np.zeros((len(lengths), context_length), np.int64)
  for b, n in enumerate(lengths):
    ids[b, 0] = _SOT
    ids[b, 1:n + 1] = rng.integers(1, _SOT, n)  # ordinary BPE ids, < SOT
    ids[b, n + 1] = _EOT
  return ids


def _images(rng, batch, size):
  """[B, H, W, 3] float32, roughly normalised pixels."""
  return rng.normal(size=(batch, size, size, 3)).astype(np.float32)


def _nchw(images):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _features(result):
  """get_*_features returns a tensor (transformers 4) or an output whose
  pooler_output is the projected feature (transformers 5)."""
  return (result if isinstance(result, torch.Tensor) else result.pooler_output).numpy()


def _run_ours(params, cfg, images, ids):
  model = clip.CLIP(cfg)
  fn = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
  return jax.tree.map(np.asarray, fn(params, images, ids.astype(np.int32)))


_TINY_OPEN_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128,
                 "heads": 2, "layers": 2},
}


class OpenClipParityTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    torch.set_grad_enabled(False)
    cls.addClassCleanup(torch.set_grad_enabled, True)  # other test files need grad
    cls._config_dir = tempfile.mkdtemp()
    for quick_gelu in (True, False):
      name = f"fixclip-test-tiny-{'quickgelu' if quick_gelu else 'gelu'}"
      with open(os.path.join(cls._config_dir, name + ".json"), "w") as f:
        json.dump({**_TINY_OPEN_CLIP, "quick_gelu": quick_gelu}, f)
    open_clip.add_model_config(cls._config_dir)

  def _compare(self, name, model, params, cfg, batch, seed):
    rng = np.random.default_rng(seed)
    images = _images(rng, batch, cfg.image_size)
    lengths = [3, cfg.context_length - 2, 10, 40][:batch]
    ids = _token_ids(rng, lengths, cfg.context_length)
    ref_image = model.encode_image(_nchw(images)).numpy()
    ref_text = model.encode_text(torch.from_numpy(ids)).numpy()
    out = _run_ours(params, cfg, images, ids)
    err_image = _rel_err(out["image"]["embedding"], ref_image)
    err_text = _rel_err(out["text"]["embedding"], ref_text)
    print(f"[parity] open_clip {name}: image rel err {err_image:.2e}, "
          f"text rel err {err_text:.2e}")
    self.assertLess(err_image, _TOL)
    self.assertLess(err_text, _TOL)
    np.testing.assert_allclose(float(params["logit_scale"]),
                               float(model.logit_scale), rtol=0)

  @parameterized.parameters(("quickgelu", "quick_gelu"), ("gelu", "gelu"))
  def test_tiny_from_file(self, variant, act):
    model = open_clip.create_model(f"fixclip-test-tiny-{variant}", pretrained=None)
    model.eval()
    _perturb(model, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "open_clip.pt")
      torch.save(model.state_dict(), path)
      params, cfg, fmt = loader.load_torch_checkpoint(path, act=act)
    self.assertEqual(fmt, "openai")
    self.assertEqual((cfg.vision_width, cfg.vision_layers, cfg.vision_heads,
                      cfg.patch_size, cfg.image_size, cfg.embed_dim, cfg.act),
                     (128, 2, 2, 8, 32, 64, act))
    self._compare(f"tiny-{variant}", model, params, cfg, batch=4, seed=2)

  def test_b16_quickgelu(self):
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    model.eval()
    _perturb(model, seed=3, scale=0.01)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = layouts.config_from_shapes({k: v.shape for k, v in sd.items()})
    self.assertEqual((cfg.vision_width, cfg.vision_layers, cfg.vision_heads,
                      cfg.text_width, cfg.text_heads, cfg.embed_dim),
                     (768, 12, 12, 512, 8, 512))
    params = layouts.state_dict_to_params(sd, cfg, "openai", "ViT-B-16-quickgelu")
    del sd
    self._compare("ViT-B-16-quickgelu", model, params, cfg, batch=2, seed=4)


class HuggingFaceParityTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    torch.set_grad_enabled(False)
    cls.addClassCleanup(torch.set_grad_enabled, True)  # other test files need grad

  @parameterized.parameters("quick_gelu", "gelu")
  def test_tiny_clip_model(self, act):
    hf_cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=96, intermediate_size=320,
                         num_hidden_layers=3, num_attention_heads=3,
                         max_position_embeddings=40, hidden_act=act),
        vision_config=dict(hidden_size=128, intermediate_size=384,
                           num_hidden_layers=2, num_attention_heads=4,
                           image_size=48, patch_size=16, hidden_act=act),
        projection_dim=32)
    torch.manual_seed(5)
    model = transformers.CLIPModel(hf_cfg).eval()
    _perturb(model, seed=6)
    with tempfile.TemporaryDirectory() as tmp:
      model.save_pretrained(tmp)
      params, cfg, fmt = loader.load_torch_checkpoint(tmp)
    self.assertEqual(fmt, "hf")
    self.assertEqual((cfg.text_heads, cfg.vision_heads, cfg.context_length, cfg.act),
                     (3, 4, 40, act))

    rng = np.random.default_rng(7)
    images = _images(rng, 3, 48)
    ids = _token_ids(rng, [2, 38, 17], 40)
    ref = model(input_ids=torch.from_numpy(ids), pixel_values=_nchw(images),
                output_hidden_states=True)
    ref_image = _features(model.get_image_features(pixel_values=_nchw(images)))
    ref_text = _features(model.get_text_features(input_ids=torch.from_numpy(ids)))
    out = _run_ours(params, cfg, images, ids)
    image = np.asarray(clip.normalize(out["image"]["embedding"]))
    text = np.asarray(clip.normalize(out["text"]["embedding"]))
    errs = {
        "image": _rel_err(out["image"]["embedding"], ref_image),
        "text": _rel_err(out["text"]["embedding"], ref_text),
        # CLIPModel.forward's normalised embeddings and scaled logits.
        "image normalised": _rel_err(image, ref.image_embeds.numpy()),
        "text normalised": _rel_err(text, ref.text_embeds.numpy()),
        "logits": _rel_err(np.exp(out["logit_scale"]) * image @ text.T,
                           ref.logits_per_image.numpy()),
    }
    # Tokens of the last layer: HF's text last_hidden_state is after the final
    # LN, the vision one before post_layernorm (applied here).
    vis_ref = ref.vision_model_output
    errs["vision tokens"] = _rel_err(
        out["image"]["tokens"],
        model.vision_model.post_layernorm(vis_ref.last_hidden_state).numpy())
    errs["text tokens"] = _rel_err(out["text"]["tokens"],
                                   ref.text_model_output.last_hidden_state.numpy())
    # Per-layer CLS / EOT tokens of the residual stream (hidden_states[0] is
    # the embedding output, [l + 1] the output of block l).
    eot = ids.argmax(-1)
    rows = np.arange(len(ids))
    for l in range(cfg.vision_layers):
      errs[f"vision layer {l}"] = _rel_err(out["image"]["layer_tokens"][l],
                                           vis_ref.hidden_states[l + 1][:, 0].numpy())
    for l in range(cfg.text_layers):
      hs = ref.text_model_output.hidden_states[l + 1].numpy()
      errs[f"text layer {l}"] = _rel_err(out["text"]["layer_tokens"][l], hs[rows, eot])
    print(f"[parity] HF CLIPModel tiny ({act}): " +
          ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    for name, err in errs.items():
      self.assertLess(err, _TOL, name)


if __name__ == "__main__":
  absltest.main()
