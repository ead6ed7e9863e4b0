"""Long-CLIP / FIX-CLIP checkpoints: two position tables against PyTorch,
--stretch, FIX-CLIP extra keys, --drop_extra, init_from (method.md §2, §3)."""
import json
import os
import subprocess
import sys
import tempfile

from absl import logging
from absl.testing import absltest
import jax
import numpy as np
import open_clip
import torch

from fixclip_jax import checkpoint
from fixclip_jax import convert
from fixclip_jax import layouts
from fixclip_jax import loader
from fixclip_jax import pretrained as pretrained_lib
from fixclip_jax import torch_files
from fixclip_jax.models import clip
from fixclip_jax.models import positional
from fixclip_jax.models import sizes

_TINY_248 = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 248, "vocab_size": 49408, "width": 128,
                 "heads": 2, "layers": 2},
}


def _ids(rng, lengths, context):
  ids = np.zeros((len(lengths), context), np.int64)
  for row, n in enumerate(lengths):
    ids[row, 0] = 49406
    ids[row, 1:n - 1] = rng.integers(1, 49405, size=n - 2)
    ids[row, n - 1] = 49407
  return ids


class LongCLIPCheckpointTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cfg_dir = os.path.join(cls.tmp, "oc_configs")
    os.makedirs(cfg_dir)
    with open(os.path.join(cfg_dir, "fixclip-test-tiny-248.json"), "w") as f:
      json.dump(_TINY_248, f)
    open_clip.add_model_config(cfg_dir)

  def test_two_tables_match_pytorch_forward_and_export_bit_exact(self):
    torch.manual_seed(0)
    model = open_clip.create_model("fixclip-test-tiny-248", pretrained=None).eval()
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.02 * torch.randn_like(p))
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
          if k != "attn_mask"}
    pe = sd["positional_embedding"]
    pe_res = pe + 0.05 * np.random.default_rng(1).normal(size=pe.shape).astype(np.float32)
    sd["positional_embedding_res"] = pe_res
    path = os.path.join(self.tmp, "longclip.pt")
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)

    # Long-CLIP's PyTorch forward adds pe * mask[:20] + pe_res * mask[20:].
    mask = np.zeros((248, 1), np.float32)
    mask[:20] = 1
    with torch.no_grad():
      model.positional_embedding.copy_(torch.from_numpy(pe * mask + pe_res * (1 - mask)))
      ids = _ids(np.random.default_rng(2), [30, 120, 248], 248)
      ref = model.encode_text(torch.from_numpy(ids)).numpy()

    params, cfg, fmt = loader.load_torch_checkpoint(path)
    self.assertEqual(fmt, "longclip")
    self.assertEqual((cfg.context_length, cfg.positional_keep), (248, 20))
    ours = clip.CLIP(cfg).apply({"params": params}, ids.astype(np.int32),
                                method=clip.CLIP.encode_text)["embedding"]
    err = np.linalg.norm(np.asarray(ours) - ref) / np.linalg.norm(ref)
    print(f"Long-CLIP 248-token text features vs PyTorch: rel err {err:.2e}")
    self.assertLess(err, 1e-4)

    back = layouts.params_to_openai_state_dict(params, cfg)
    self.assertEqual(set(back), set(sd) - {"logit_scale"} | {"logit_scale"})
    for k, v in sd.items():
      np.testing.assert_array_equal(back[k], v, err_msg=k)

  def test_stretch_flag(self):
    cfg77 = sizes.get_config("tiny")
    params = jax.device_get(clip.init_params(cfg77))
    src = os.path.join(self.tmp, "openai77.pt")
    convert.save_openai(src, params, cfg77, overwrite=True)
    dst = os.path.join(self.tmp, "stretched")
    cfg, _ = convert.convert(src, dst, "orbax",
                             params_transform=convert.stretch_transform(248))
    loaded, loaded_cfg = checkpoint.load_model(dst)
    self.assertEqual(loaded_cfg, cfg)
    self.assertEqual((cfg.context_length, cfg.positional_keep), (248, 20))
    want = positional.stretch_positional_embedding(params["text"]["positional_embedding"])
    np.testing.assert_array_equal(loaded["text"]["positional_embedding"], want)
    np.testing.assert_array_equal(loaded["text"]["positional_embedding_res"], want)
    with self.assertRaisesRegex(torch_files.CheckpointError, "already has 248"):
      convert.convert(dst, os.path.join(self.tmp, "again"), "orbax",
                      params_transform=convert.stretch_transform(248))
    self.assertFalse(os.path.exists(os.path.join(self.tmp, "again")))


  def test_cli_stretch_then_export(self):
    cfg77 = sizes.get_config("tiny")
    params = jax.device_get(clip.init_params(cfg77))
    src = os.path.join(self.tmp, "cli_src.pt")
    convert.save_openai(src, params, cfg77, overwrite=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = lambda *args: subprocess.run([sys.executable, "-m", "fixclip_jax.convert", *args],
                                       cwd=root, capture_output=True, text=True, timeout=300)
    dst = os.path.join(self.tmp, "cli_248")
    proc = run(f"--src={src}", f"--dst={dst}", "--stretch=248")
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertEqual(checkpoint.load_model_config(dst).context_length, 248)
    out = os.path.join(self.tmp, "cli_248.pt")
    proc = run(f"--src={dst}", f"--dst={out}", "--to=openai")
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertIn("positional_embedding_res", torch.load(out, weights_only=True))
    proc = run(f"--src={dst}", f"--dst={out}", "--to=openai")  # exists: refused
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("already exists", proc.stderr)


class FixCLIPCheckpointTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.cfg = sizes.get_config("tiny", context_length=248, positional_keep=20,
                                num_prompts=4, prompt_layers=(1, 2),
                                mask_token=True, gta_groups=2)
    self.params = jax.device_get(clip.init_params(self.cfg, jax.random.PRNGKey(3)))

  def test_extra_keys_round_trip_exact(self):
    path = os.path.join(self.tmp, "fixclip.pt")
    convert.save_openai(path, self.params, self.cfg)
    sd = torch.load(path, weights_only=True)
    extra = sorted(k for k in sd if k.startswith("fixclip."))
    self.assertIn("fixclip.visual.prompts.1", extra)
    self.assertNotIn("fixclip.visual.prompts.0", extra)
    self.assertIn("fixclip.visual.mask_token", extra)
    self.assertIn("fixclip.text.gta.1.linear.weight", extra)
    params, cfg, _ = loader.load_torch_checkpoint(path)
    self.assertEqual(cfg, self.cfg)
    jax.tree.map(np.testing.assert_array_equal, params, self.params)

  def test_drop_extra_writes_plain_longclip_layout(self):
    path = os.path.join(self.tmp, "plain.pt")
    stripped, cfg = layouts.strip_fixclip(self.params, self.cfg)
    convert.save_openai(path, stripped, cfg)
    sd = torch.load(path, weights_only=True)
    self.assertFalse([k for k in sd if k.startswith("fixclip.")])
    self.assertIn("positional_embedding_res", sd)
    params, plain_cfg, fmt = loader.load_torch_checkpoint(path)
    self.assertEqual(fmt, "longclip")
    self.assertEqual((plain_cfg.num_prompts, plain_cfg.gta_groups), (0, 0))
    np.testing.assert_array_equal(params["text"]["token_embedding"],
                                  self.params["text"]["token_embedding"])
    # HF's layout has no place for them: --to=hf drops them as --drop_extra does.
    convert.save_hf(os.path.join(self.tmp, "hf"), self.params, self.cfg)
    convert.save_hf(os.path.join(self.tmp, "hf_plain"), stripped, cfg)
    for name in ("model.safetensors", "config.json"):
      with open(os.path.join(self.tmp, "hf", name), "rb") as f, \
           open(os.path.join(self.tmp, "hf_plain", name), "rb") as g:
        self.assertEqual(f.read(), g.read(), name)

  def test_init_from_clip_keeps_weights_and_lists_new_params(self):
    cfg77 = sizes.get_config("tiny")
    pretrained = jax.device_get(clip.init_params(cfg77, jax.random.PRNGKey(5)))
    src = os.path.join(self.tmp, "clip_orbax")
    checkpoint.save_model(src, pretrained, cfg77)
    with self.assertLogs(level="INFO") as logs:
      logging.get_absl_handler()  # route absl logging through `logging`
      params = pretrained_lib.load_pretrained(src, self.cfg, self.params,
                                              logit_scale=float(np.log(100)))
    log = "\n".join(logs.output)
    self.assertIn("new parameter(s)", log)
    self.assertIn("visual/mask_token", log)
    self.assertIn("visual/transformer/prompts_1", log)
    np.testing.assert_array_equal(params["visual"]["conv1"]["kernel"],
                                  pretrained["visual"]["conv1"]["kernel"])
    np.testing.assert_array_equal(
        params["text"]["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"],
        pretrained["text"]["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"])
    np.testing.assert_array_equal(params["visual"]["mask_token"],
                                  self.params["visual"]["mask_token"])
    stretched = positional.stretch_positional_embedding(
        pretrained["text"]["positional_embedding"])
    np.testing.assert_array_equal(params["text"]["positional_embedding"], stretched)
    np.testing.assert_array_equal(params["text"]["positional_embedding_res"], stretched)
    np.testing.assert_allclose(params["logit_scale"], np.log(100), rtol=1e-6)
    # The merged tree runs in the FIX-CLIP model.
    clip.CLIP(self.cfg).apply({"params": params}, np.zeros((1, 32, 32, 3), np.float32),
                              np.zeros((1, 248), np.int32))

  def test_init_from_shape_mismatch_names_key(self):
    other = sizes.get_config("tiny").replace(embed_dim=32)
    pretrained = jax.device_get(clip.init_params(other))
    with self.assertRaisesRegex(ValueError, r"parameter \S+ has shape \(128, 32\) in the checkpoint, model expects \(128, 64\)"):
      pretrained_lib.adapt_pretrained(pretrained, other, self.params, self.cfg)


if __name__ == "__main__":
  absltest.main()
