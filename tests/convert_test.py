"""Tests for fixclip_jax.convert and the model part of fixclip_jax.checkpoint.

Round trips start from real PyTorch state dicts (a random-init open_clip model,
a random-init HF CLIPModel written by save_pretrained) and must give back every
tensor bit for bit. Bad inputs must fail with one clear error and leave no
output behind.
"""
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import open_clip
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from fixclip_jax import checkpoint
from fixclip_jax import convert
from fixclip_jax import layouts
from fixclip_jax import loader
from fixclip_jax import torch_files
from fixclip_jax.models import clip
from fixclip_jax.models.sizes import get_config

_SOT, _EOT = 49406, 49407
_OPEN_CLIP_NAME = "fixclip-convert-test-tiny"


class _NotATensor:
  """A custom class: pickling it makes a file that needs an arbitrary unpickle."""

  def __init__(self):
    self.payload = [1, 2, 3]


def _perturb(module, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      if p.dim() > 0:
        p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def _open_clip_state_dict(seed=0):
  """{key: tensor} of a perturbed random-init tiny open_clip model."""
  model = open_clip.create_model(_OPEN_CLIP_NAME, pretrained=None).eval()
  _perturb(model, seed)
  return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hf_config(context_length=77):
  return transformers.CLIPConfig(
      text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=context_length),
      vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=16),
      projection_dim=32)


def _hf_model(seed=0, context_length=77):
  torch.manual_seed(seed)
  model = transformers.CLIPModel(_hf_config(context_length)).eval()
  _perturb(model, seed + 1)
  return model


def _token_ids(rng, lengths, context_length):
  ids = np.zeros((len(lengths), context_length), np.int64)
  for b, n in enumerate(lengths):
    ids[b, 0], ids[b, n + 1] = _SOT, _EOT
    ids[b, 1:n + 1] = rng.integers(1, _SOT, n)
  return ids


def _hf_features(model, images_nhwc, ids):
  """Unnormalised projected features (transformers 4 or 5 return types)."""
  as_np = lambda r: (r if isinstance(r, torch.Tensor) else r.pooler_output).numpy()
  pixels = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  return (as_np(model.get_image_features(pixel_values=pixels)),
          as_np(model.get_text_features(input_ids=torch.from_numpy(ids))))


def _our_features(params, cfg, images, ids):
  out = clip.CLIP(cfg).apply({"params": params}, images, ids.astype(np.int32))
  return np.asarray(out["image"]["embedding"]), np.asarray(out["text"]["embedding"])


def _rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def _assert_same_tensors(test, got, want):
  test.assertEqual(sorted(got), sorted(want))
  for k in want:
    g, w = np.asarray(got[k]), np.asarray(want[k])
    test.assertEqual(g.shape, w.shape, k)
    test.assertTrue(np.array_equal(g, w), f"{k} differs after the round trip")


def _numpy(sd):
  return {k: v.numpy() for k, v in sd.items()}


class ConvertTestBase(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    torch.set_grad_enabled(False)
    cls.addClassCleanup(torch.set_grad_enabled, True)  # other test files need grad
    config_dir = tempfile.mkdtemp()
    with open(os.path.join(config_dir, _OPEN_CLIP_NAME + ".json"), "w") as f:
      # Head width 64 in both towers, as `config_from_shapes` assumes.
      json.dump({"embed_dim": 32, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 128,
                                "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408,
                              "width": 128, "heads": 2, "layers": 2}}, f)
    open_clip.add_model_config(config_dir)

  def setUp(self):
    super().setUp()
    # tempfile rather than create_tempdir: absl flags are unparsed under pytest.
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

  def path(self, *names):
    return os.path.join(self.tmp, *names)


class RoundTripTest(ConvertTestBase):

  @parameterized.parameters((".pt", ".pt"), (".safetensors", ".pt"),
                            (".pt", ".safetensors"))
  def test_openai_torch_orbax_torch_is_exact(self, src_ext, dst_ext):
    _, sd = _open_clip_state_dict()
    src = self.path("open_clip" + src_ext)
    if src_ext == ".pt":
      torch.save(sd, src)
    else:
      safetensors.numpy.save_file(_numpy(sd), src)
    cfg, fmt = convert.convert(src, self.path("orbax"))
    self.assertEqual(fmt, "openai")
    self.assertEqual((cfg.vision_width, cfg.vision_heads, cfg.text_layers,
                      cfg.embed_dim, cfg.context_length), (128, 2, 2, 32, 77))
    convert.convert(self.path("orbax"), self.path("back" + dst_ext), to="openai")
    back = torch_files.read_state_dict(self.path("back" + dst_ext))
    _assert_same_tensors(self, back, _numpy(sd))
    if dst_ext == ".pt":  # a plain dict of tensors, loadable by open_clip
      raw = torch.load(self.path("back.pt"), map_location="cpu", weights_only=True)
      self.assertTrue(all(isinstance(v, torch.Tensor) for v in raw.values()))
      model = open_clip.create_model(_OPEN_CLIP_NAME, pretrained=None)
      model.load_state_dict(raw, strict=True)

  def test_orbax_model_dir_round_trip(self):
    # FIX-CLIP fields too: prompt_layers is a tuple, which JSON turns into a list.
    cfg = get_config("tiny", context_length=40, positional_keep=20,
                     num_prompts=2, prompt_layers=(0, 1))
    params = clip.init_params(cfg, jax.random.PRNGKey(3))
    checkpoint.save_model(self.path("m"), params, cfg)
    loaded, loaded_cfg = checkpoint.load_model(self.path("m"))
    self.assertEqual(loaded_cfg, cfg)
    jax.tree.map(lambda a, b: self.assertTrue(np.array_equal(a, b)), loaded,
                 jax.device_get(params))
    self.assertEqual(os.listdir(self.tmp), ["m"])  # no temp dirs left
    with self.assertRaisesRegex(FileExistsError, "already exists"):
      checkpoint.save_model(self.path("m"), params, cfg)

  def test_hf_torch_orbax_hf_is_exact_and_loads(self):
    model = _hf_model()
    model.save_pretrained(self.path("hf_src"))
    original = safetensors.numpy.load_file(self.path("hf_src", "model.safetensors"))
    cfg, fmt = convert.convert(self.path("hf_src"), self.path("orbax"))
    self.assertEqual(fmt, "hf")
    convert.convert(self.path("orbax"), self.path("hf_back"), to="hf")
    back = safetensors.numpy.load_file(self.path("hf_back", "model.safetensors"))
    _assert_same_tensors(self, back, original)

    reloaded = transformers.CLIPModel.from_pretrained(self.path("hf_back")).eval()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = _token_ids(rng, [4, 60], 77)
    for got, want in zip(_hf_features(reloaded, images, ids),
                         _hf_features(model, images, ids)):
      np.testing.assert_array_equal(got, want)
    self.assertEqual(cfg, layouts.config_from_hf(
        json.load(open(self.path("hf_back", "config.json")))))

  def test_open_clip_to_hf_matches_open_clip(self):
    """Export of a model that did not come from HF: HF runs it like open_clip."""
    model, sd = _open_clip_state_dict(seed=4)
    torch.save(sd, self.path("oc.pt"))
    convert.convert(self.path("oc.pt"), self.path("hf"), to="hf")
    hf = transformers.CLIPModel.from_pretrained(self.path("hf")).eval()
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = _token_ids(rng, [5, 30], 77)
    hf_image, hf_text = _hf_features(hf, images, ids)
    ref_image = model.encode_image(
        torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    ref_text = model.encode_text(torch.from_numpy(ids)).numpy()
    errs = _rel_err(hf_image, ref_image), _rel_err(hf_text, ref_text)
    print(f"[convert] open_clip -> HF dir: image rel err {errs[0]:.2e}, "
          f"text rel err {errs[1]:.2e}")
    self.assertLess(max(errs), 1e-4)

  def test_longclip_layout_round_trip(self):
    _, sd = _open_clip_state_dict(seed=5)
    gen = torch.Generator().manual_seed(6)
    sd["positional_embedding"] = torch.randn(248, 128, generator=gen)
    sd["positional_embedding_res"] = torch.randn(248, 128, generator=gen)
    torch.save(sd, self.path("longclip-tiny.pt"))
    self.assertEqual(loader.detect_format(self.path("longclip-tiny.pt")), "longclip")
    params, cfg, fmt = loader.load_torch_checkpoint(self.path("longclip-tiny.pt"))
    self.assertEqual((fmt, cfg.context_length, cfg.positional_keep), ("longclip", 248, 20))
    convert.convert(self.path("longclip-tiny.pt"), self.path("orbax"))
    convert.convert(self.path("orbax"), self.path("back.pt"), to="openai")
    _assert_same_tensors(self, torch_files.read_state_dict(self.path("back.pt")), _numpy(sd))

    # HF has one table: rows < 20 from the first, the rest from _res.
    convert.convert(self.path("orbax"), self.path("hf"), to="hf")
    hf_sd = safetensors.numpy.load_file(self.path("hf", "model.safetensors"))
    table = hf_sd["text_model.embeddings.position_embedding.weight"]
    np.testing.assert_array_equal(table[:20], sd["positional_embedding"][:20].numpy())
    np.testing.assert_array_equal(table[20:], sd["positional_embedding_res"][20:].numpy())
    hf = transformers.CLIPModel.from_pretrained(self.path("hf")).eval()
    self.assertEqual(hf.config.text_config.max_position_embeddings, 248)
    rng = np.random.default_rng(2)
    ids = _token_ids(rng, [3, 200], 248)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    _, hf_text = _hf_features(hf, images, ids)
    _, ours_text = _our_features(params, cfg, images, ids)
    self.assertLess(_rel_err(ours_text, hf_text), 1e-4)


class FormatTest(ConvertTestBase):

  def test_safetensors_and_hf_dirs_load_without_torch(self):
    _, sd = _open_clip_state_dict()
    # bfloat16 tensors (numpy has no such dtype) are upcast exactly.
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
            for k, v in sd.items()}
    safetensors.torch.save_file(half, self.path("bf16.safetensors"))
    want = {k: v.float().numpy() for k, v in half.items()}
    _hf_model().save_pretrained(self.path("hf"))
    with_torch, hf_cfg, _ = loader.load_any(self.path("hf"))
    with mock.patch.dict(sys.modules, {"torch": None, "safetensors.torch": None}):
      got = torch_files.read_state_dict(self.path("bf16.safetensors"))
      without_torch, cfg, fmt = loader.load_any(self.path("hf"))
    _assert_same_tensors(self, got, want)
    self.assertEqual(got["ln_final.weight"].dtype, np.float32)
    self.assertEqual((fmt, cfg), ("hf", hf_cfg))
    jax.tree.map(np.testing.assert_array_equal, without_torch, with_torch)

  def test_detects_formats(self):
    _, sd = _open_clip_state_dict()
    torch.save(sd, self.path("a.pt"))
    safetensors.numpy.save_file(_numpy(sd), self.path("a.safetensors"))
    _hf_model().save_pretrained(self.path("hf"))
    convert.convert(self.path("a.pt"), self.path("orbax"))
    self.assertEqual(loader.detect_format(self.path("a.pt")), "openai")
    self.assertEqual(loader.detect_format(self.path("a.safetensors")), "openai")
    self.assertEqual(loader.detect_format(self.path("hf")), "hf")
    self.assertEqual(loader.detect_format(self.path("orbax")), "orbax")
    _, _, fmt = loader.load_any(self.path("orbax"))
    self.assertEqual(fmt, "orbax")

  def test_unwraps_nested_state_dict_and_module_prefix(self):
    _, sd = _open_clip_state_dict()
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}},
               self.path("train.pt"))
    got = torch_files.read_state_dict(self.path("train.pt"))
    _assert_same_tensors(self, got, _numpy(sd))
    _, _, fmt = loader.load_torch_checkpoint(self.path("train.pt"))
    self.assertEqual(fmt, "openai")

  def test_hf_config_fields(self):
    cfg = layouts.config_from_hf(_hf_config(context_length=248).to_dict())
    self.assertEqual((cfg.context_length, cfg.text_width, cfg.vision_heads,
                      cfg.patch_size, cfg.embed_dim), (248, 64, 2, 16, 32))
    hf = layouts.hf_config_dict(cfg)
    self.assertEqual(hf["text_config"]["max_position_embeddings"], 248)
    self.assertEqual(hf["text_config"]["eos_token_id"], _EOT)
    self.assertEqual(hf["vision_config"]["layer_norm_eps"], 1e-5)
    bad = _hf_config().to_dict()
    bad["vision_config"]["hidden_act"] = "gelu_new"
    with self.assertRaisesRegex(torch_files.CheckpointError, "vision_config.hidden_act"):
      layouts.config_from_hf(bad)


class BadInputTest(ConvertTestBase):

  def _assert_fails_cleanly(self, src, pattern, to="orbax"):
    before = sorted(os.listdir(self.tmp))
    dst = self.path("out" + (".pt" if to == "openai" else ""))
    with self.assertRaisesRegex(Exception, pattern):
      convert.convert(src, dst, to=to)
    self.assertFalse(os.path.exists(dst))
    self.assertEqual(sorted(os.listdir(self.tmp)), before)  # no temp leftovers

  def _save(self, sd, name="bad.pt"):
    torch.save(sd, self.path(name))
    return self.path(name)

  def test_truncated_pt(self):
    _, sd = _open_clip_state_dict()
    src = self._save(sd)
    with open(src, "rb") as f:
      data = f.read()
    with open(src, "wb") as f:
      f.write(data[:len(data) // 2])
    self._assert_fails_cleanly(src, r"bad\.pt.*truncated")

  def test_truncated_safetensors(self):
    _, sd = _open_clip_state_dict()
    src = self.path("bad.safetensors")
    safetensors.numpy.save_file(_numpy(sd), src)
    with open(src, "r+b") as f:
      f.truncate(os.path.getsize(src) // 3)
    self._assert_fails_cleanly(src, r"bad\.safetensors.*truncated")

  def test_wrong_shape_names_key_and_both_shapes(self):
    _, sd = _open_clip_state_dict()
    key = "transformer.resblocks.1.mlp.c_fc.weight"
    sd[key] = torch.zeros(512, 127)
    self._assert_fails_cleanly(
        self._save(sd), re.escape(f"'{key}': expected shape (512, 128), found (512, 127)"))

  def test_missing_key(self):
    _, sd = _open_clip_state_dict()
    del sd["visual.transformer.resblocks.0.attn.out_proj.bias"]
    self._assert_fails_cleanly(
        self._save(sd),
        r"missing key 'visual\.transformer\.resblocks\.0\.attn\.out_proj\.bias' "
        r"\(expected shape \(128,\)\)")

  def test_unexpected_key(self):
    _, sd = _open_clip_state_dict()
    sd["logit_bias"] = torch.zeros(1)
    self._assert_fails_cleanly(self._save(sd),
                               r"unexpected key 'logit_bias' \(found shape \(1,\)\)")

  def test_hf_wrong_shape(self):
    _hf_model().save_pretrained(self.path("hf"))
    sd = safetensors.numpy.load_file(self.path("hf", "model.safetensors"))
    key = "vision_model.encoder.layers.1.self_attn.k_proj.weight"
    sd[key] = np.zeros((64, 63), np.float32)
    safetensors.numpy.save_file(sd, self.path("hf", "model.safetensors"),
                                metadata={"format": "pt"})
    self._assert_fails_cleanly(self.path("hf"), re.escape(
        f"'{key}': expected shape (64, 64), found (64, 63)"))

  def test_custom_class_pickle_is_refused(self):
    _, sd = _open_clip_state_dict()
    sd["extra"] = _NotATensor()
    self._assert_fails_cleanly(self._save(sd, "evil.pt"), r"evil\.pt.*refused")

  def test_a_wrong_inferred_size_is_named_under_its_own_key(self):
    # ln_final.weight gives the text width: one mis-shaped copy must not change
    # the inferred model (and every other key's expected shape).
    _, sd = _open_clip_state_dict()
    sd = _numpy(sd)
    sd["ln_final.weight"] = np.ones((100,), np.float32)
    src = self.path("width.safetensors")
    safetensors.numpy.save_file(sd, src)
    self._assert_fails_cleanly(src, re.escape(
        "does not match the model: key 'ln_final.weight': expected shape "
        "(128,), found (100,)") + "$")

  def test_raw_pickle_and_torchscript_are_refused_with_the_way_out(self):
    _, sd = _open_clip_state_dict()
    with open(self.path("raw.pt"), "wb") as f:
      pickle.dump(_numpy(sd), f)  # a plain pickle of numpy arrays
    self._assert_fails_cleanly(self.path("raw.pt"), (
        r"raw\.pt: refused: this file needs an arbitrary unpickle .*convert it "
        r"with python -c .*torch\.load\('.*raw\.pt', weights_only=False\).* "
        r"or re-save with torch\.save\(state_dict\)"))
    torch.jit.script(torch.nn.Linear(2, 2)).save(self.path("jit.pt"))
    self._assert_fails_cleanly(self.path("jit.pt"), (
        r"jit\.pt: refused: a TorchScript archive .*torch\.jit\.load\("))

  def test_hf_config_errors_name_the_field(self):
    good = _hf_config().to_dict()
    heads = json.loads(json.dumps(good))
    heads["vision_config"]["num_attention_heads"] = 3
    string = json.loads(json.dumps(good))
    string["text_config"]["hidden_size"] = "64"
    for config, pattern in (
        ([good], r"expected a JSON object .*found list"),
        (heads, r"vision_config\.num_attention_heads=3 does not divide "
                r"vision_config\.hidden_size=64"),
        (string, r"text_config\.hidden_size='64' must be a positive integer"),
        ({k: v for k, v in good.items() if k != "vision_config"},
         r"no vision_config")):
      with self.subTest(pattern):
        directory = tempfile.mkdtemp(dir=self.tmp)
        with open(os.path.join(directory, "config.json"), "w") as f:
          json.dump(config, f)
        with self.assertRaisesRegex(torch_files.CheckpointError,
                                    "config.json: " + pattern):
          loader.load_any(directory)

  def test_params_not_matching_config_are_refused(self):
    cfg = get_config("tiny")
    params = jax.device_get(clip.init_params(cfg))
    params["visual"]["extra"] = np.zeros((3,), np.float32)
    with self.assertRaisesRegex(ValueError, "unexpected 'visual/extra'"):
      convert.save_openai(self.path("x.pt"), params, cfg)
    self.assertEqual(os.listdir(self.tmp), [])

  def test_fixclip_params_are_not_silently_dropped(self):
    # Regional prompts change the CLS feature: HF's CLIPModel can't hold them
    # (the OpenAI layout writes them under fixclip.* keys, see
    # longclip_convert_test.py): save_hf drops them and says so.
    cfg = get_config("tiny", num_prompts=2)
    params = jax.device_get(clip.init_params(cfg))
    with self.assertRaisesRegex(torch_files.CheckpointError, "prompts_0.*no place"):
      layouts.params_to_hf_state_dict(params, cfg)
    with self.assertLogs(level="WARNING") as logs:
      convert.save_hf(self.path("x"), params, cfg)
    self.assertRegex("\n".join(logs.output), "without FIX-CLIP's regional "
                     "prompts.*image features are plain CLIP's")
    self.assertEqual(loader.load_any(self.path("x"))[1].num_prompts, 0)


if __name__ == "__main__":
  absltest.main()
