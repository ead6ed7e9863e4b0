"""tools/bench.py: a short benchmark of the tiny demo config, with the open_clip
comparison, on all (8 virtual CPU) devices as training would use them."""
import json
import math
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from fixclip_jax import config_base
from fixclip_jax import flops
from fixclip_jax import sharding
from fixclip_jax.data import synthetic
from fixclip_jax.data import tokenizers
from fixclip_jax.models import clip
from fixclip_jax.models import sizes
from fixclip_jax.tools import bench


def demo_config():
  """configs/demo.py's get_config(), loaded by path as --config does."""
  return config_base.load_config_file(
      os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))


def positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


class PeakTableTest(absltest.TestCase):

  def test_device_kinds(self):
    self.assertEqual(flops.peak_tflops_for("NVIDIA H100 80GB HBM3"), 989.0)
    self.assertEqual(flops.peak_tflops_for("NVIDIA H100 PCIe"), 756.0)
    self.assertEqual(flops.peak_tflops_for("NVIDIA H200"), 989.0)
    self.assertEqual(flops.peak_tflops_for("NVIDIA A100-SXM4-80GB"), 312.0)
    self.assertEqual(flops.peak_tflops_for("TPU v4"), 275.0)
    self.assertEqual(flops.peak_tflops_for("TPU v5 lite"), 197.0)
    self.assertEqual(flops.peak_tflops_for("TPU v5"), 459.0)
    self.assertEqual(flops.peak_tflops_for("TPU v5p"), 459.0)
    self.assertEqual(flops.peak_tflops_for("TPU v6 lite"), 918.0)
    self.assertIsNone(flops.peak_tflops_for("cpu"))


class SyntheticBatchTest(absltest.TestCase):

  def test_shapes_and_eot(self):
    c = demo_config()
    cfg = sizes.model_config(c)
    b = bench.synthetic_batch(c, cfg, 4)
    self.assertEqual(b["image"].shape, (4, 32, 32, 3))
    self.assertEqual(b["image"].dtype, np.uint8)             # as the pipeline sends
    self.assertEqual(b["text_long"].shape, (4, 248))
    self.assertEqual(b["text_short"].shape, (4, 77))
    for t in (b["text_long"], b["text_short"]):
      self.assertEqual(t.dtype, np.int32)
      # The EOT (largest id) is where the towers pool: exactly one per row.
      np.testing.assert_array_equal((t == cfg.vocab_size - 1).sum(1), 1)

  def test_caption_length_ranges(self):
    c = demo_config()
    cfg = sizes.model_config(c)
    b = bench.synthetic_batch(c, cfg, 64, caption_lengths=((166, 194), (28, 34)))
    for key, (lo, hi) in (("text_long", (166, 194)), ("text_short", (28, 34))):
      lengths = b[key].argmax(1) + 1                         # EOT = largest id
      self.assertBetween(lengths.min(), lo, hi)
      self.assertBetween(lengths.max(), lo, hi)
      self.assertTrue((b[key][np.arange(64), lengths - 1] == cfg.vocab_size - 1).all())
    self.assertIsNone(bench.parse_caption_lengths("uniform"))
    self.assertEqual(bench.parse_caption_lengths("100:135,20:30"),
                     ((100, 135), (20, 30)))
    with self.assertRaisesRegex(ValueError, "LO:HI"):
      bench.parse_caption_lengths("100-135")

  def test_synthetic_lengths_are_the_generators(self):
    """CAPTION_LENGTHS["synthetic"] is what data/synthetic.py's captions
    tokenise to (CLIP BPE), long captions and their first-sentence summaries."""
    tok = tokenizers.get_tokenizer("clip")
    examples = synthetic.synthetic_examples(256, image_size=16)
    (long_lo, long_hi), (short_lo, short_hi) = bench.CAPTION_LENGTHS["synthetic"]
    for texts, lo, hi in (([e["caption"] for e in examples], long_lo, long_hi),
                          ([e["short_caption"] for e in examples], short_lo, short_hi)):
      lengths = tok(texts, 248).argmax(1) + 1
      self.assertBetween(np.percentile(lengths, 1), lo, hi)
      self.assertBetween(np.percentile(lengths, 99), lo, hi)
      self.assertLessEqual(abs(lengths.min() - lo), 4)
      self.assertLessEqual(abs(lengths.max() - hi), 4)


class ModelOverridesTest(absltest.TestCase):

  def test_overrides_add_and_change_model_fields(self):
    c = bench.with_model_overrides(demo_config(), ["vision_layers=4", "gta_groups=4",
                                                   "image_size=64"])
    cfg = sizes.model_config(c)
    self.assertEqual((cfg.vision_layers, cfg.gta_groups, cfg.image_size), (4, 4, 64))
    self.assertEqual(cfg.text_layers, 2)                     # untouched
    with self.assertRaises(Exception):
      bench.with_model_overrides(demo_config(), ["vision_layers"])


class MaskingModeTest(absltest.TestCase):

  def test_reported_only_for_objectives_that_mask(self):
    c = demo_config()
    c.masking.mode = "drop"
    self.assertEqual(bench.masking_mode(c), "drop")          # fixclip masks
    for name in ("clip", "longclip"):
      c.objective = name
      self.assertEqual(bench.masking_mode(c), "n/a")
    c.objective = "nope"
    with self.assertRaisesRegex(ValueError, "nope"):
      bench.masking_mode(c)


class RunBenchmarkTest(absltest.TestCase):

  def test_tiny_with_torch(self):
    n = len(jax.devices())
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "out", "bench.json")
      r = bench.run_benchmark(demo_config(), batch=n, steps=2, warmup=1,
                              eval_steps=1, peak_tflops=1.0, compare_torch=True,
                              json_path=path, config_name="configs/demo.py")
      with open(path) as f:
        written = json.load(f)
      self.assertEqual(os.listdir(os.path.dirname(path)), ["bench.json"])  # no temp left
    self.assertEqual(written["images_per_s"], r["images_per_s"])
    self.assertEqual(r["num_devices"], n)
    self.assertEqual(r["batch"], n)
    for key in ("images_per_s", "achieved_tflops_per_s", "mfu", "compile_s",
                "xla_flops_per_step", "eval_images_per_s", "eval_texts_per_s",
                "torch_images_per_s", "twin_images_per_s", "ratio_twin_over_torch",
                "ratio_ours_over_torch_per_flop"):
      self.assertTrue(positive(r[key]), f"{key}={r[key]!r}")
    for key in ("step_time_s", "torch_step_time_s", "twin_step_time_s"):
      t = r[key]
      self.assertTrue(all(positive(t[q]) for q in ("median", "p10", "p90")), t)
      self.assertLessEqual(t["p10"], t["median"])
      self.assertLessEqual(t["median"], t["p90"])
    # The config's length buckets cut the random captions (EOT anywhere).
    self.assertEqual(r["context_lengths"], [248, 77])
    self.assertEqual(r["analytic_flops_per_step"], flops.train_step_flops(
        demo_config(), batch=n, lengths=r["text_lengths"])["total"])
    self.assertGreater(r["host_peak_rss_bytes"], 100 * 2 ** 20)
    self.assertGreaterEqual(r["host_peak_rss_bytes"], r["host_peak_rss_after_step_bytes"])
    self.assertGreater(r["xla_memory_plan_per_device"]["temps"], 0)
    phases = r["host_rss_phases_bytes"]
    self.assertEqual(list(phases), ["start", "init_state", "compiled", "first_step"])
    self.assertTrue(all(positive(v) for v in phases.values()), phases)
    self.assertLessEqual(phases["first_step"], r["host_peak_rss_after_step_bytes"])
    self.assertIn("| host RSS now: start / init_state / compiled / first_step |",
                  bench.format_table(r))
    self.assertAlmostEqual(r["mfu"], r["achieved_tflops_per_s"] / n, places=12)
    # The step is partitioned over the devices; cost_analysis x devices must
    # land near the analytic count (replicated optimizer work makes it larger).
    self.assertBetween(r["xla_over_analytic"], 0.9, 1.3)
    # The twin runs no short-caption pass: XLA ~ one text pass.
    self.assertBetween(r["twin_xla_flops_per_step"] / r["twin_analytic_flops_per_step"],
                       0.9, 1.3)
    self.assertEqual(r["peak_memory_bytes"], "n/a")          # CPU has no stats
    self.assertEqual(r["torch_precision"], "float32")
    self.assertEqual(r["masking_mode"], demo_config().masking.mode)
    table = bench.format_table(r)
    for row in ("| step time |", "| MFU |", "| twin / open_clip step time |",
                "| eval texts/s |"):
      self.assertIn(row, table)

  def test_open_clip_model_matches_our_size(self):
    import open_clip  # pylint: disable=g-import-not-at-top
    twin_config = bench.plain_clip_twin(demo_config())
    cfg = sizes.model_config(twin_config)
    host = bench.synthetic_batch(twin_config, cfg, 2)
    torch_step = bench.TorchTrainStep(twin_config, cfg, host)
    ours = jax.eval_shape(lambda: clip.init_params(cfg))
    ours_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours))
    # Long-CLIP's second positional table is ours only (same shape as the first).
    extra = int(np.prod(ours["text"]["positional_embedding_res"].shape))
    theirs_count = sum(p.numel() for p in torch_step.model.parameters())
    self.assertEqual(theirs_count, ours_count - extra)
    self.assertIsInstance(torch_step.model, open_clip.CLIP)
    torch_step()                                             # one real step runs
    torch_step()
    # A batch cut to a bucket: open_clip's context follows the text width.
    cut = dict(host, text_long=host["text_long"][:, :64])
    cut_step = bench.TorchTrainStep(twin_config, cfg, cut)
    self.assertEqual(cut_step.model.positional_embedding.shape[0], 64)
    cut_step()

  def test_bucket_comparison(self):
    n = len(jax.devices())
    lengths = bench.CAPTION_LENGTHS["synthetic"]
    r = bench.run_benchmark(demo_config(), batch=n, steps=1, warmup=0,
                            eval_steps=0, caption_lengths=lengths,
                            compare_buckets=True)
    # 166-194-token captions -> bucket 224 of 248; 28-34 -> 48 of 77.
    self.assertEqual(r["bucket_text_lengths"], [224, 48])
    self.assertEqual(r["unbucketed_text_lengths"], [248, 77])
    self.assertEqual(r["text_lengths"], [224, 48])
    want = (flops.train_step_flops(demo_config(), batch=n, lengths=(224, 48))["total"] /
            flops.train_step_flops(demo_config(), batch=n)["total"])
    self.assertAlmostEqual(r["predicted_bucketed_over_unbucketed"], want, places=12)
    self.assertLess(want, 0.9)
    self.assertTrue(positive(r["ratio_bucketed_over_unbucketed"]))
    # (At one example per device the plan is mostly parameter-sized buffers,
    # so only its presence is checked here.)
    for plan in r["bucket_xla_memory_plan"].values():
      self.assertGreater(plan["temps"], 0)
    self.assertIn("| buckets: on / off, measured (predicted from FLOPs) |",
                  bench.format_table(r))
    with self.assertRaisesRegex(ValueError, "empty"):
      bench.bucket_comparison(bench.without_buckets(demo_config()), None, 0, 1, None)

  def test_memory_variants(self):
    c = demo_config()
    v = bench.memory_variants(c)
    self.assertEqual(list(v), ["config", "buckets off", "remat=full", "masking=drop",
                               "plain CLIP twin", "CLIP-77 twin"])
    self.assertEqual(v["buckets off"].data.long_buckets, ())
    self.assertEqual(v["remat=full"].remat, "full")
    self.assertEqual(v["masking=drop"].masking.mode, "drop")
    t77 = v["CLIP-77 twin"]
    self.assertEqual((t77.objective, t77.model.context_length), ("clip", 77))
    self.assertEqual(flops.text_lengths(t77.data), (77, 77))
    self.assertEqual(c.remat, "none")                          # copies, not edits
    c.objective = "clip"
    self.assertNotIn("masking=drop", bench.memory_variants(c))
    # Compile one (the cheapest) and read its plan; the rest are the same code.
    c = demo_config()
    c.data.global_batch = len(jax.devices())
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
    r = bench.memory_comparison(c, mesh, bench.CAPTION_LENGTHS["synthetic"],
                                names=["CLIP-77 twin"])
    self.assertEqual(list(r["memory_variants"]), ["CLIP-77 twin"])
    m = r["memory_variants"]["CLIP-77 twin"]
    self.assertEqual(m["text_lengths"][0], 77)                 # 166-194 tokens cut to 77
    self.assertGreater(m["plan"]["temps"], 0)

  def test_cli_writes_json(self):
    root = os.path.join(os.path.dirname(__file__), "..")
    out = os.path.join(tempfile.mkdtemp(), "bench.json")
    proc = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.tools.bench", "--config=configs/demo.py",
         "--config.data.global_batch=8", "--steps=1", "--warmup=1",
         "--eval_steps=1", f"--json={out}"],
        cwd=root, capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    result = json.load(open(out))
    self.assertIn("| images/s |", proc.stdout)
    self.assertEqual(result["batch"], 8)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "steps"):
      bench.run_benchmark(demo_config(), steps=0)
    with self.assertRaisesRegex(ValueError, "batch"):
      bench.run_benchmark(demo_config(), batch=0, steps=1)


if __name__ == "__main__":
  absltest.main()
