"""Training: optimizer masks, the sharded step, NaN skipping, learning, resume."""
import json
import os
import re
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from fixclip_jax import checkpoint
from fixclip_jax import config_base
from fixclip_jax import config_check
from fixclip_jax import loader
from fixclip_jax import pretrained
from fixclip_jax import sharding
from fixclip_jax import step as step_lib
from fixclip_jax import train
from fixclip_jax.evaluation import report
from fixclip_jax.models import clip
from fixclip_jax.models import sizes

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config(**overrides):
  c = config_base.load_config_file(os.path.join(_ROOT, "configs", "demo.py"))
  c.data.global_batch = 8
  c.data.synthetic_num = 64
  c.data.short_context = 77
  c.log_every = 1
  c.eval_every = 0
  c.pretrain77.steps = 0  # one stage, from scratch (Pretrain77Test: both)
  # One compiled step per run: synthetic captions fall in two length buckets,
  # each another ~30-60 s compile (LoopTest's bucket test turns them on).
  c.data.long_buckets = c.data.short_buckets = ()
  c.optim.lr = c.optim.new_params_lr = 1e-3
  for key, value in overrides.items():
    node = c
    *parents, name = key.split(".")
    for p in parents:
      node = node[p]
    node[name] = value
  return c


def random_batch(cfg, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  text = np.zeros((batch, cfg.context_length), np.int32)
  text[:, 0] = 49406
  text[:, 1:40] = rng.integers(1, 49000, size=(batch, 39))
  text[:, 40] = 49407
  return {"image": rng.normal(size=(batch, cfg.image_size, cfg.image_size, 3)
                              ).astype(np.float32),
          "text_long": text, "text_short": text[:, :77].copy()}


def run_steps(config, batches, mesh):
  """Params before, params after, and the metrics of each step."""
  cfg = sizes.model_config(config)
  model = step_lib.make_model(config, cfg)
  state, shardings, tx = step_lib.init_state(config, model, mesh)
  before = jax.device_get(state["params"])
  step = step_lib.jit_train_step(
      step_lib.make_train_step(config, model, tx),
      mesh, shardings, batches[0])
  metrics = []
  for batch in batches:
    state, m = step(state, sharding.global_batch(batch, mesh))
    metrics.append(jax.device_get(m))
  return before, jax.device_get(state["params"]), metrics


def one_step(config, batch_np, mesh):
  before, after, metrics = run_steps(config, [batch_np], mesh)
  return before, after, metrics[0]


class StepTest(absltest.TestCase):

  def test_frozen_positions_bit_identical_others_change(self):
    config = demo_config(**{"optim.warmup_steps": 0})
    mesh = sharding.make_mesh()
    before, after, metrics = one_step(config, random_batch(
        sizes.model_config(config)), mesh)
    self.assertEqual(int(metrics["skipped"]), 0)
    t0, t1 = before["text"], after["text"]
    np.testing.assert_array_equal(t0["positional_embedding"], t1["positional_embedding"])
    np.testing.assert_array_equal(t0["positional_embedding_res"][:20],
                                  t1["positional_embedding_res"][:20])
    self.assertFalse(np.array_equal(t0["positional_embedding_res"][20:41],
                                    t1["positional_embedding_res"][20:41]))
    # Every other parameter that the batch touches moves.
    for path in (("visual", "conv1", "kernel"), ("visual", "mask_token"),
                 ("visual", "transformer", "prompts_0"), ("text", "gta", "ln_1", "scale"),
                 ("text", "transformer", "resblocks_1", "mlp", "c_fc", "kernel")):
      a, b = before, after
      for k in path:
        a, b = a[k], b[k]
      self.assertFalse(np.array_equal(a, b), "/".join(path))

  def test_nan_batch_is_skipped(self):
    config = demo_config()
    batch = random_batch(sizes.model_config(config))
    batch["image"][3, 0, 0, 0] = np.nan
    before, after, metrics = one_step(config, batch, sharding.make_mesh())
    self.assertEqual(int(metrics["skipped"]), 1)
    self.assertGreater(int(metrics["nonfinite_features"]), 0)
    jax.tree.map(np.testing.assert_array_equal, before, after)

  def test_sharded_steps_match_single_device(self):
    config = demo_config()
    cfg = sizes.model_config(config)
    batches = [random_batch(cfg, seed=s) for s in range(5)]
    one = sharding.make_mesh(devices=jax.devices()[:1])
    _, p1, m1 = run_steps(config, batches, one)
    eight = sharding.make_mesh(data=4, fsdp=2)
    _, p8, m8 = run_steps(config, batches, eight)
    for step in range(5):
      for k in ("loss", "loss_long", "loss_short", "loss_gta_2"):
        np.testing.assert_allclose(m1[step][k], m8[step][k], rtol=1e-5,
                                   err_msg=f"step {step} {k}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 p1, p8)

  def test_frozen_gradients_do_not_count_in_the_clipping_norm(self):
    config = demo_config(**{"optim.grad_clip": 1.0, "optim.warmup_steps": 0})
    params = jax.device_get(clip.init_params(sizes.model_config(config)))
    tx = step_lib.make_optimizer(params, config.optim, config.num_train_steps)
    state = tx.init(params)
    ones = jax.tree.map(np.ones_like, params)

    def updates_with_frozen_grad(value):
      grads = jax.tree.map(lambda x: x, ones)
      grads["text"] = dict(grads["text"], positional_embedding=np.full_like(
          params["text"]["positional_embedding"], value))
      return tx.update(grads, state, params)[0]

    small, huge = updates_with_frozen_grad(0.0), updates_with_frozen_grad(1e6)
    jax.tree.map(np.testing.assert_array_equal, small, huge)
    np.testing.assert_array_equal(huge["text"]["positional_embedding"], 0.0)

  def test_logit_scale_cap_is_a_knob(self):
    above = float(np.log(100.0)) + 0.5
    for cap, want_capped in ((float(np.log(100.0)), True), (None, False)):
      # The step caps whatever the objective: plain CLIP compiles in a
      # fraction of FIX-CLIP's time.
      config = demo_config(**{"loss.max_logit_scale": cap, "objective": "clip",
                              **config_base.PLAIN_CLIP})
      cfg = sizes.model_config(config)
      model = step_lib.make_model(config, cfg)
      params = jax.device_get(clip.init_params(cfg))
      params["logit_scale"] = np.float32(above)
      mesh = sharding.make_mesh()
      state, shardings, tx = step_lib.init_state(config, model, mesh, params)
      batch = random_batch(cfg)
      step = step_lib.jit_train_step(step_lib.make_train_step(config, model, tx),
                                     mesh, shardings, batch)
      state, metrics = step(state, sharding.global_batch(batch, mesh))
      scale = float(jax.device_get(state["params"]["logit_scale"]))
      if want_capped:
        self.assertAlmostEqual(scale, np.log(100.0), places=5)
        self.assertAlmostEqual(float(metrics["temperature"]), 100.0, places=3)
      else:
        self.assertGreater(scale, np.log(100.0) + 0.4)
        self.assertGreater(float(metrics["temperature"]), 100.0 * np.exp(0.4))

  def test_fsdp_rules_shard_big_params(self):
    mesh = sharding.make_mesh(data=4, fsdp=2)
    tree = {"big": jnp.zeros((1024, 512)), "small": jnp.zeros((8,)),
            "ruled": jnp.zeros((1024, 512))}
    specs = sharding.param_specs(tree, mesh, rules=[("ruled", "replicate")])
    self.assertEqual(specs["big"], jax.sharding.PartitionSpec("fsdp", None))
    self.assertEqual(specs["small"], jax.sharding.PartitionSpec())
    self.assertEqual(specs["ruled"], jax.sharding.PartitionSpec())

  def test_sharding_rules_name_param_paths_in_the_train_state(self):
    # config.sharding_rules match parameter paths as WORKSPACE.md documents
    # them ("visual/..."), and Adam's moments follow their parameter.
    rule = r"visual/transformer/resblocks_\d+/mlp/c_fc/kernel"
    config = demo_config(sharding_rules=((rule, (None, "fsdp")),))
    mesh = sharding.make_mesh(data=4, fsdp=2)
    model = step_lib.make_model(config, sizes.model_config(config))
    abstract, shardings, _ = step_lib.abstract_state(config, model, mesh)
    fsdp_last = jax.sharding.PartitionSpec(None, "fsdp")
    kernel = lambda tree: tree["visual"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"]
    self.assertEqual(kernel(shardings["params"]).spec, fsdp_last)
    self.assertEqual(kernel(abstract["params"]).sharding.spec, fsdp_last)
    moments = [s for p, s in jax.tree_util.tree_flatten_with_path(
        shardings["opt_state"])[0]
               if sharding.path_str(p).endswith("visual/transformer/resblocks_0/mlp/c_fc/kernel")]
    self.assertLen(moments, 2)  # mu and nu
    for s in moments:
      self.assertEqual(s.spec, fsdp_last)
    # Unruled params keep the default: FSDP when big, replicated when small.
    self.assertEqual(shardings["params"]["text"]["token_embedding"].spec,
                     jax.sharding.PartitionSpec("fsdp", None))
    self.assertEqual(shardings["params"]["text"]["ln_final"]["scale"].spec,
                     jax.sharding.PartitionSpec())
    # The abstract state allocates nothing and has the real state's structure.
    state, real_shardings, _ = step_lib.init_state(config, model, mesh)
    self.assertEqual(jax.tree.structure(abstract), jax.tree.structure(state))
    jax.tree.map(lambda a, x: self.assertEqual((a.shape, a.dtype), (x.shape, x.dtype)),
                 abstract, state)
    self.assertEqual(kernel(state["params"]).sharding.spec, fsdp_last)


class LoopTest(absltest.TestCase):

  def test_tiny_fixclip_learns_synthetic_data(self):
    config = demo_config(**{"num_train_steps": 50, "data.global_batch": 16,
                            "data.synthetic_num": 256, "optim.warmup_steps": 5,
                            "checkpoint_every": 1000})
    workdir = tempfile.mkdtemp()
    train.train_and_evaluate(config, workdir, evaluate=False)
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    self.assertLen(rows, 50)
    # Data-skip counters reach the metrics (synthetic data skips nothing).
    self.assertEqual(rows[-1]["data/skipped_unreadable_image"], 0)
    self.assertEqual(rows[-1]["skipped_total"], 0)
    for term in ("loss_long", "loss_short", "loss_gta_2"):
      first = np.mean([r[term] for r in rows[:10]])
      last = np.mean([r[term] for r in rows[-10:]])
      print(f"{term}: first 10 steps {first:.3f} -> last 10 steps {last:.3f}")
      self.assertLess(last, first - 0.1, term)

  def test_length_buckets_train_like_full_context(self):
    """The loop cuts text to length buckets (buckets.py): the same losses as
    at full context, on the pipeline's uint8 images."""
    losses, shapes = {}, {}
    for name, long_buckets, short_buckets in (
        ("on", (64, 96, 128, 160, 192, 224, 248), (16, 32, 48, 64, 77)),
        ("off", (), ())):
      config = demo_config(**{"num_train_steps": 2, "checkpoint_every": 1000,
                              "data.long_buckets": long_buckets,
                              "data.short_buckets": short_buckets})
      workdir = tempfile.mkdtemp()
      with self.assertLogs(level="INFO") as logs:
        train.train_and_evaluate(config, workdir, evaluate=False)
      shapes[name] = [l for l in logs.output if "Text buckets: new step shape" in l]
      rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
      losses[name] = np.array([[r[k] for k in ("loss", "loss_long", "loss_short")]
                               for r in rows])
    # Synthetic captions (166-194 tokens, summaries 28-34) run shorter than
    # the contexts (248, 77).
    self.assertEmpty(shapes["off"])
    self.assertNotEmpty(shapes["on"])
    for line in shapes["on"]:
      long_len, short_len = map(int, re.search(
          r"'text_long': (\d+), 'text_short': (\d+)", line).groups())
      self.assertLess(long_len, 248)
      self.assertLess(short_len, 77)
    np.testing.assert_allclose(losses["on"][0], losses["off"][0], rtol=1e-6)
    np.testing.assert_allclose(losses["on"], losses["off"], rtol=1e-5)

  def test_bad_examples_are_skipped_and_counted_in_metrics(self):
    from fixclip_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    root = os.path.join(tempfile.mkdtemp(), "data")
    manifest = synthetic.make_synthetic_dataset(root, 24, image_size=32)
    os.remove(os.path.join(root, "images", "000003.png"))            # missing file
    with open(os.path.join(root, "images", "000005.png"), "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n truncated")                      # unreadable
    config = demo_config(**{"data.type": "jsonl", "data.path": manifest,
                            "num_train_steps": 6, "checkpoint_every": 1000})
    workdir = tempfile.mkdtemp()
    train.train_and_evaluate(config, workdir, evaluate=False)
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    # 6 batches of 8 = 48 kept examples = two whole epochs of the 22 good ones
    # and a bit: each bad example was met twice (a third time at most).
    last = rows[-1]
    for reason in ("missing_file", "unreadable_image"):
      self.assertBetween(last[f"data/skipped_{reason}"], 2, 3)
    self.assertEqual(last["data/skipped_empty_caption"], 0)

  def test_preempted_run_resumes_to_the_same_state(self):
    config = demo_config(**{"num_train_steps": 4, "checkpoint_every": 100})
    straight = train.train_and_evaluate(config, tempfile.mkdtemp(), evaluate=False)

    workdir = tempfile.mkdtemp()
    # A preemption notice at step 2 (what orbax's multi-host preemption sync
    # reports; a signal sets the same stop).
    with mock.patch.object(checkpoint.TrainCheckpointManager, "reached_preemption",
                           lambda self, step: step >= 2):
      stopped = train.train_and_evaluate(config, workdir, evaluate=False)
    self.assertEqual(int(stopped["step"]), 2)
    self.assertTrue(os.path.isdir(os.path.join(workdir, "checkpoints", "2")))
    # A save killed mid-write leaves only orbax's temporary directory, which
    # is never taken for a checkpoint: the rerun resumes from step 2.
    junk = os.path.join(workdir, "checkpoints", "3.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(junk, "state"))
    with open(os.path.join(junk, "state", "half_written"), "wb") as f:
      f.write(b"\0" * 100)
    resumed = train.train_and_evaluate(config, workdir, evaluate=False)
    self.assertEqual(int(resumed["step"]), 4)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight["params"]),
                 jax.device_get(resumed["params"]))
    # The workdir itself is a model source for loader.py (export after a run).
    params, cfg, fmt = loader.load_any(workdir)
    self.assertEqual(fmt, "train_workdir")
    self.assertEqual(cfg, sizes.model_config(config))
    jax.tree.map(np.testing.assert_array_equal, params,
                 jax.device_get(resumed["params"]))


  def test_a_resume_cuts_the_rows_logged_after_its_step(self):
    # Rows of steps 1-5 and checkpoints at 3 and 5, then a resume at 3 (as
    # after a kill between step 5's row and its save): steps 4 and 5 are
    # logged again and stand once each; rows 1-3 stay byte for byte.
    config = demo_config(**{"num_train_steps": 5, "checkpoint_every": 3})
    workdir = tempfile.mkdtemp()
    train.train_and_evaluate(config, workdir, evaluate=False)
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "rb") as f:
      before = f.read().splitlines(keepends=True)
    self.assertEqual([json.loads(l)["step"] for l in before], [1, 2, 3, 4, 5])
    with open(path, "ab") as f:
      f.write(b'{"step": 5, "lo')  # a row cut short by the kill
    config.resume_step = 3
    train.train_and_evaluate(config, workdir, evaluate=False)
    with open(path, "rb") as f:
      after = f.read().splitlines(keepends=True)
    self.assertEqual([json.loads(l)["step"] for l in after], [1, 2, 3, 4, 5])
    self.assertEqual(after[:3], before[:3])


class Pretrain77Test(absltest.TestCase):
  """config.pretrain77 (the demo): a 77-token CLIP first, the run from it."""

  def test_the_run_starts_from_a_77_token_clip_trained_first(self):
    config = demo_config(**{"pretrain77.steps": 3, "num_train_steps": 2,
                            "checkpoint_every": 1000, "eval.synthetic_num": 16,
                            "eval.batch_size": 8,
                            "eval.datasets": "synthetic,synthetic_long77"})
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    state = train.train_and_evaluate(config, workdir)
    start_dir = os.path.join(workdir, train.PRETRAIN77_SUBDIR)
    with open(os.path.join(start_dir, train.CONFIG_FILE)) as f:
      stage1 = json.load(f)
    self.assertEqual((stage1["objective"], stage1["model"]["context_length"],
                      stage1["model"]["positional_keep"], stage1["num_train_steps"],
                      stage1["optim"]["frozen_regex"], stage1["pretrain77"]["steps"]),
                     ("clip", 77, None, 3, "", 0))
    with open(os.path.join(workdir, train.CONFIG_FILE)) as f:
      self.assertEqual(json.load(f)["init_from"], start_dir)
    # Stage 1 began from a smooth position table (neighbouring rows alike).
    start, _ = checkpoint.load_model(os.path.join(start_dir, train.START_MODEL_SUBDIR))
    table = start["text"]["positional_embedding"]
    cos = np.sum(table[1:] * table[:-1], 1) / np.prod(
        np.linalg.norm(np.stack([table[1:], table[:-1]]), axis=-1), 0)
    self.assertGreater(cos.min(), 0.9)
    # Stage 2 began from stage 1's last step: its frozen table is stage 1's
    # trained table stretched (KPS), untouched by stage 2's two steps.
    stage1_params, stage1_cfg = checkpoint.load_train_params(start_dir)
    self.assertEqual(stage1_cfg.context_length, 77)
    cfg = sizes.model_config(config)
    fresh = jax.device_get(state["params"])
    expected = pretrained.adapt_pretrained(stage1_params, stage1_cfg, fresh, cfg)
    np.testing.assert_array_equal(fresh["text"]["positional_embedding"],
                                  expected["text"]["positional_embedding"])
    self.assertFalse(np.array_equal(
        fresh["text"]["positional_embedding"][:20],
        jax.device_get(clip.init_params(cfg, jax.random.PRNGKey(config.seed)))
        ["text"]["positional_embedding"][:20]))
    # The table: the start's own evaluation next to the run's.
    results = report.read_results(workdir)
    start_rows = {r["protocol"]: r for r in results
                  if r["model"] == train.START_MODEL_LABEL}
    own = {r["protocol"]: r for r in report.read_results(start_dir)}
    self.assertEqual(sorted(start_rows), ["synthetic-long", "synthetic-long77",
                                          "synthetic-short"])
    for protocol, row in start_rows.items():
      self.assertEqual(row["step"], 3)
      self.assertEqual(row["t2i_R@1"], own[protocol]["t2i_R@1"])
    self.assertEqual(sorted(r["protocol"] for r in results if r["model"] == "tiny"),
                     ["synthetic-long", "synthetic-long77", "synthetic-short"])
    # A rerun resumes the finished run; stage 1 is not trained again.
    before = os.listdir(os.path.join(start_dir, "checkpoints"))
    again = train.train_and_evaluate(config, workdir, evaluate=False)
    self.assertEqual(int(again["step"]), 2)
    self.assertEqual(sorted(os.listdir(os.path.join(start_dir, "checkpoints"))),
                     sorted(before))

  def test_init_from_and_pretrain77_together_are_refused(self):
    config = demo_config(**{"pretrain77.steps": 3, "init_from": "/some/ckpt"})
    with self.assertRaisesRegex(config_check.ConfigError,
                                r"config\.pretrain77\.steps=3 .*config\.init_from="):
      config_check.check_config(config)


if __name__ == "__main__":
  absltest.main()
