"""Fault injection (issue 15): what goes wrong with one record, the input, a
checkpoint or the user's input, each on a tiny config, and what the user sees.

  bad records          skipped, counted per reason (totals continue across a
                       resume: they are in the checkpoint); the run finishes
  stalled read (FIFO)  skipped after data.read_timeout_s; a SIGTERM while the
                       loop waits for it exits 0 within 10 s, with a checkpoint
  broken checkpoints   an empty or truncated latest step: resume from the one
                       before (the broken one moved aside, never deleted)
  failed save          reported at once; the previous checkpoint is kept
  incompatible resume  refused before anything is written (byte-identical)
  user errors          one line, exit status 2, nothing written
Each case prints `[fault] CASE: what the user saw` (`pytest -s` shows them).
"""
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import absltest
import grain
import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint._src.path import atomicity
from PIL import Image
import safetensors.numpy

from fixclip_jax import checkpoint
from fixclip_jax import config_base
from fixclip_jax import config_check
from fixclip_jax import layouts
from fixclip_jax import train
from fixclip_jax.data import pipeline
from fixclip_jax.models import clip
from fixclip_jax.models import sizes
from tests import train_test

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The demo model made cheaper to compile: CLIP's objective, 77 tokens, no
# FIX-CLIP parts, no text buckets (one compiled step).
SMALL = {"objective": "clip", "model.num_prompts": 0, "model.mask_token": False,
         "model.gta_groups": 0, "model.context_length": 77,
         "data.text_context": 77,
         "data.short_context": 77, "data.long_buckets": (),
         "data.short_buckets": (), "optim.frozen_regex": "",
         "optim.new_params_regex": "", "eval_at_start": False}
# The same as command-line flags (main.py runs in a subprocess).
SMALL_FLAGS = [
    "--config.objective=clip", "--config.model.num_prompts=0",
    "--config.model.mask_token=False", "--config.model.gta_groups=0",
    "--config.model.context_length=77", "--config.data.text_context=77",
    "--config.data.short_context=77", "--config.data.long_buckets=()",
    "--config.data.short_buckets=()", "--config.optim.frozen_regex=",
    "--config.optim.new_params_regex=", "--config.eval_at_start=False",
    "--config.data.global_batch=8", "--config.data.synthetic_num=16",
    "--config.log_every=1", "--config.eval_every=0",
    "--config.pretrain77.steps=0"]
MAX_PIXELS = 50_000  # data.max_image_pixels of these runs

# Bad records: kind -> the skip reason it is counted under (None: kept).
BAD_KINDS = {
    "symlink_loop": "unreadable_file", "directory": "unreadable_file",
    "char_device": "unreadable_file", "image_int": "bad_record",
    "image_null": "bad_record", "short_caption_int": "bad_record",
    "not_json": "bad_record", "fifo": "read_timeout",
    "too_large_png": "image_too_large", "truncated": "unreadable_image",
    "missing": "missing_file"}


def _png(path, size=(40, 36), colour=(30, 120, 200)):
  Image.new("RGB", size, colour).save(path, format="PNG")


def _record_line(root, kind, rid):
  """The manifest line of record `rid` of this kind (making its file)."""
  caption = f"A picture of scene {rid}. Colours and shapes."
  line = {"image": f"r{rid}.png", "caption": caption, "key": f"k{rid}"}
  path = os.path.join(root, line["image"])
  if kind in ("good", "short_caption_int"):
    _png(path, colour=(rid * 9 % 256, 80, 160))
  elif kind == "large_jpeg":  # over the limit, decodes at 1/2 scale: kept
    line["image"] = f"r{rid}.jpg"
    Image.new("RGB", (400, 400), (200, 90, rid)).save(
        os.path.join(root, line["image"]), format="JPEG")
  elif kind == "symlink_loop":
    os.symlink(f"r{rid}b.png", path)
    os.symlink(f"r{rid}.png", os.path.join(root, f"r{rid}b.png"))
  elif kind == "directory":
    os.makedirs(path)
  elif kind == "char_device":
    line["image"] = "/dev/zero"  # read forever if it were read
  elif kind == "fifo":
    os.mkfifo(path)  # open() waits for a writer that never comes
  elif kind == "too_large_png":
    _png(path, size=(300, 300))
  elif kind == "truncated":
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    with open(path, "wb") as f:
      f.write(buf.getvalue()[:120])
  if kind == "image_int":
    line["image"] = 123
  elif kind == "image_null":
    line["image"] = None
  elif kind == "short_caption_int":
    line["short_caption"] = 5
  elif kind == "not_json":
    return "{not json"
  return json.dumps(line)


def write_planned_manifest(root, plan, seed=0):
  """A manifest whose stream (the pipeline's shuffled order for `seed`, one
  host) yields the kinds of `plan` in order. Returns (path, {kind: line})."""
  os.makedirs(root, exist_ok=True)
  order = grain.MapDataset.range(len(plan))[0::1].shuffle(seed=seed)
  lines, line_of = [None] * len(plan), {}
  for position, kind in enumerate(plan):
    rid = int(order[position])
    lines[rid] = _record_line(root, kind, rid)
    line_of.setdefault(kind, rid + 1)
  path = os.path.join(root, "manifest.jsonl")
  with open(path, "w") as f:
    f.write("".join(line + "\n" for line in lines))
  return path, line_of


def release_fifos(root):
  """Lets reads blocked in open() of the FIFOs under `root` go."""
  for name in os.listdir(root):
    path = os.path.join(root, name)
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
      try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
      except OSError:  # no reader waiting, or not a FIFO
        pass


def metric_rows(workdir):
  """{step: row} of metrics.jsonl (a step logged again: its last row)."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      rows.setdefault(row["step"], {}).update(row)
  return rows


def skip_totals(row):
  return {r: int(row[f"data/skipped_{r}"]) for r in pipeline.SKIP_REASONS}


def tree_digest(root):
  """Names, sizes and contents of everything under `root`."""
  digest = hashlib.sha256()
  for parent, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(dirs + files):
      path = os.path.join(parent, name)
      digest.update(os.path.relpath(path, root).encode())
      if os.path.isfile(path) and not os.path.islink(path):
        with open(path, "rb") as f:
          digest.update(f.read())
  return digest.hexdigest()


def report(case, message):
  print(f"[fault] {case}: {' '.join(str(message).split())}", flush=True)


def _fail_step_dir(step, error):
  """orbax's final rename of step `step` raises `error` (an unwritable step
  folder), in its background commit thread."""
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if os.path.basename(os.fspath(self._tmp_path)).startswith(f"{step}."):
      raise error
    return await original(self, *args, **kwargs)

  return mock.patch.object(atomicity.AtomicRenameTemporaryPath, "finalize",
                           finalize)


def _biggest_file(directory):
  files = [os.path.join(p, f) for p, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _data_iterator():
  return pipeline.BackgroundBatches(
      iter(grain.MapDataset.range(100).to_iter_dataset()))


# ----------------------------------------------------------------------------
# Training runs (in this process): bad records, a broken latest checkpoint,
# a failed save, an incompatible resume.

class TrainingFaultsTest(absltest.TestCase):

  def test_bad_records_broken_latest_step_failed_save_incompatible_resume(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    data = os.path.join(root, "data")
    # Every bad record comes first in the stream: the first batch carries all
    # their counts, so the totals are exact from step 1 on.
    plan = list(BAD_KINDS) + ["large_jpeg"] + ["good"] * 15
    manifest, line_of = write_planned_manifest(data, plan)
    self.addCleanup(release_fifos, data)
    expected = dict.fromkeys(pipeline.SKIP_REASONS, 0)
    for reason in BAD_KINDS.values():
      expected[reason] += 1
    workdir = os.path.join(root, "run")

    def config(**overrides):
      return train_test.demo_config(**{
          **SMALL, "data.type": "jsonl", "data.path": manifest,
          "data.read_timeout_s": 1.0, "data.max_image_pixels": MAX_PIXELS,
          "checkpoint_every": 1, **overrides})

    # 1. Bad records: each skipped, counted and logged with its manifest line;
    # the run finishes.
    pipeline.SKIP_LOG.reset()
    with self.assertLogs("absl", "WARNING") as logs:
      state = train.train_and_evaluate(config(num_train_steps=2), workdir,
                                       evaluate=False)
    self.assertEqual(int(jax.device_get(state["step"])), 2)
    rows = metric_rows(workdir)
    self.assertEqual(skip_totals(rows[1]), expected)
    self.assertEqual(skip_totals(rows[2]), expected)
    skips = [l for l in logs.output if "Skipped example" in l]
    for kind, reason in BAD_KINDS.items():
      line = [l for l in skips if f"({reason}," in l and
              f"manifest.jsonl:{line_of[kind]}" in l]
      self.assertNotEmpty(line, f"{kind}: {skips}")  # (read again ahead)
      report(f"bad record {kind} -> {reason}", line[0].split(":absl:", 1)[-1])
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints"))),
                     ["1", "2"])

    # 2. The latest step is broken (a truncated array file): resume from step
    # 1, the broken one kept aside; the skip totals go on from step 1's.
    # 3. The final save fails (an unwritable step folder): reported, and the
    # previous checkpoint stays although keep_checkpoints=1.
    state_dir = os.path.join(workdir, "checkpoints", "2", "state")
    with open(_biggest_file(state_dir), "r+b") as f:
      f.truncate(os.path.getsize(f.name) // 2)
    denied = PermissionError(13, "Permission denied (simulated read-only step "
                             "folder)")
    with self.assertLogs("absl", "WARNING") as logs, _fail_step_dir(4, denied):
      with self.assertRaises(checkpoint.CheckpointSaveError) as failed:
        train.train_and_evaluate(config(num_train_steps=4, checkpoint_every=2,
                                        keep_checkpoints=1), workdir,
                                 evaluate=False)
    text = "\n".join(logs.output)
    self.assertRegex(text, r"cannot restore it \(step 2: .*OUT_OF_RANGE.*"
                     r"checkpoints/2/state")
    self.assertRegex(text, r"step 2 could not be restored; moved to .*"
                     r"unrestorable_checkpoints/2 .*resuming from step 1")
    report("truncated latest checkpoint", next(
        l for l in logs.output if "cannot restore it" in l).split(":absl:", 1)[-1])
    self.assertTrue(os.listdir(os.path.join(workdir, "unrestorable_checkpoints",
                                            "2", "state")))
    self.assertEqual(skip_totals(metric_rows(workdir)[2]), expected)
    message = str(failed.exception)
    self.assertRegex(message, r"Saving the checkpoint of step 4 in .*"
                     r"checkpoints failed: the folder is not writable "
                     r"\(permission denied\); PermissionError: .*Permission "
                     r"denied.*the newest good checkpoint, step 2, is kept")
    report("failed save (unwritable step folder)", message)
    self.assertEqual([d for d in os.listdir(os.path.join(workdir, "checkpoints"))
                      if d.isdigit()], ["2"])
    params, _ = checkpoint.load_train_params(workdir)  # step 2 restores
    self.assertIn("visual", params)

    # 4. A resume with another model, or another process count: refused
    # before anything is written, naming the fields.
    before = tree_digest(workdir)
    with self.assertRaises(checkpoint.WorkdirMismatchError) as refused:
      train.train_and_evaluate(config(**{"model.num_prompts": 2,
                                         "model.mask_token": True}),
                               workdir, evaluate=False)
    self.assertRegex(str(refused.exception),
                     r"holds checkpoints of another model .*mask_token: False "
                     r"in the workdir, True in this config; num_prompts: 0 in "
                     r"the workdir, 2 in this config")
    report("incompatible resume (model)", refused.exception)
    self.assertEqual(tree_digest(workdir), before)
    run_file = os.path.join(workdir, checkpoint.RUN_FILE)
    with open(run_file) as f:
      recorded = f.read()
    with open(run_file, "w") as f:
      json.dump({"process_count": 2, "device_count": 16}, f)
    before = tree_digest(workdir)
    with self.assertRaisesRegex(checkpoint.WorkdirMismatchError,
                                r"written by 2 process\(es\); this run has 1"
                                ) as refused:
      train.train_and_evaluate(config(), workdir, evaluate=False)
    report("resume on another process count", refused.exception)
    self.assertEqual(tree_digest(workdir), before)
    with open(run_file, "w") as f:
      f.write(recorded)


# ----------------------------------------------------------------------------
# Checkpoints alone (a small state, no model).

class CheckpointFaultsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
    # 16 KiB of noise: stored in an array file of its own (not inlined).
    self.abstract = {"w": jax.ShapeDtypeStruct(
        (4096,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
            jax.devices()[0]))}

  def _save(self, manager, step, wait=True):
    w = np.random.default_rng(step).normal(size=4096).astype(np.float32)
    w[0] = step
    checkpoint.save_train_state(manager, step, {"w": jnp.asarray(w)},
                                _data_iterator(), force=True, wait=wait)

  def _restore_newest(self):
    manager = checkpoint.make_train_manager(self.workdir, keep=5)
    with self.assertLogs("absl", "WARNING") as logs:
      state, step = checkpoint.restore_newest(manager, self.abstract,
                                              _data_iterator())
    ours = [l for l in logs.output if "cannot restore it" in l or "moved to" in l]
    return float(state["w"][0]), step, ours

  def test_empty_then_truncated_latest_steps_resume_from_the_one_before(self):
    manager = checkpoint.make_train_manager(self.workdir, keep=5)
    for step in (1, 2, 3):
      self._save(manager, step)
    os.makedirs(os.path.join(self.workdir, "checkpoints", "4"))  # empty
    value, step, logs = self._restore_newest()
    self.assertEqual((value, step), (3.0, 3))
    self.assertRegex(logs[0], r"cannot restore it \(step 4: .*checkpoints/4/ "
                     r"is empty\)")
    self.assertRegex(logs[1], r"moved to .*unrestorable_checkpoints/4")
    report("empty latest checkpoint", logs[0].split(":absl:", 1)[-1])
    with open(_biggest_file(os.path.join(self.workdir, "checkpoints", "3",
                                         "state")), "r+b") as f:
      f.truncate(os.path.getsize(f.name) // 2)  # the array's bytes
    value, step, logs = self._restore_newest()
    self.assertEqual((value, step), (2.0, 2))
    self.assertRegex(logs[0], r"step 3: OUT_OF_RANGE: Error reading .* at "
                     r"local file .*checkpoints/3/state/")
    report("truncated array file", logs[0].split(":absl:", 1)[-1])
    metadata = os.path.join(self.workdir, "checkpoints", "2", "state",
                            "_METADATA")
    with open(metadata, "r+b") as f:
      f.truncate(os.path.getsize(metadata) // 2)
    value, step, logs = self._restore_newest()
    self.assertEqual((value, step), (1.0, 1))
    self.assertRegex(logs[0], r"step 2: .*checkpoints/2/state/_METADATA: not "
                     r"valid JSON")
    report("truncated metadata file", logs[0].split(":absl:", 1)[-1])
    self.assertEqual(sorted(os.listdir(os.path.join(
        self.workdir, checkpoint.UNRESTORABLE_SUBDIR))), ["2", "3", "4"])

  def test_all_steps_broken_is_an_error_and_moves_nothing(self):
    manager = checkpoint.make_train_manager(self.workdir, keep=5)
    os.makedirs(os.path.join(self.workdir, "checkpoints", "7"))
    with self.assertRaisesRegex(checkpoint.RestoreError,
                                r"No checkpoint in .* can be restored: step 7"):
      checkpoint.restore_newest(manager, self.abstract, _data_iterator())
    self.assertTrue(os.path.isdir(os.path.join(self.workdir, "checkpoints", "7")))

  def test_a_failed_background_save_is_reported_without_a_next_save(self):
    manager = checkpoint.make_train_manager(self.workdir, keep=1)
    self._save(manager, 1)
    with _fail_step_dir(2, OSError(28, "No space left on device (simulated)")):
      self._save(manager, 2, wait=False)  # returns while it is written
      deadline = time.monotonic() + 60
      with self.assertRaisesRegex(checkpoint.CheckpointSaveError,
                                  r"step 2 .*No space left.*step 1, is kept"):
        while time.monotonic() < deadline:  # what the loop does every step
          checkpoint.check_saves(manager)
          time.sleep(0.05)
    self.assertEqual([d for d in os.listdir(os.path.join(
        self.workdir, "checkpoints")) if d.isdigit()], ["1"])

  def test_a_disk_without_room_is_refused_before_writing(self):
    manager = checkpoint.make_train_manager(self.workdir, keep=1)
    self._save(manager, 1)
    with mock.patch.object(checkpoint, "free_bytes", return_value=1 << 20):
      with self.assertRaisesRegex(checkpoint.CheckpointSaveError,
                                  r"Not enough free space for the checkpoint of "
                                  r"step 2: it needs about .* GiB, .* has 0.00 "
                                  r"GiB free; the newest good checkpoint, step "
                                  r"1, is kept") as full:
        self._save(manager, 2)
    report("no free space", full.exception)
    self.assertEqual(sorted(os.listdir(os.path.join(
        self.workdir, "checkpoints"))), ["1"])

  def test_a_second_signal_gets_the_default_action(self):
    before = signal.getsignal(signal.SIGTERM)
    with train.PreemptionGuard() as guard:
      self.assertNotEqual(signal.getsignal(signal.SIGTERM), signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.monotonic() + 5
      while not guard.requested and time.monotonic() < deadline:
        time.sleep(0.01)
      self.assertTrue(guard.requested)
      # A second signal would now end the process at once.
      self.assertEqual(signal.getsignal(signal.SIGTERM), signal.SIG_DFL)
      self.assertEqual(signal.getsignal(signal.SIGINT), signal.SIG_DFL)
    self.assertEqual(signal.getsignal(signal.SIGTERM), before)


class OversizedImageTest(absltest.TestCase):

  def test_jpeg_and_jpeg2000_decode_reduced_others_are_too_large(self):
    def encoded(fmt, size=(400, 300)):
      buf = io.BytesIO()
      Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt)
      return buf.getvalue()
    self.assertIsNone(pipeline.decode_oversized(encoded("PNG"), 120_000))
    self.assertIsNone(pipeline.decode_oversized(encoded("PNG"), 0))
    for fmt, limit, size in (("JPEG", 40_000, (200, 150)),  # 1/2
                             ("JPEG", 2_000, (50, 38)),     # 1/8
                             ("JPEG2000", 40_000, (200, 150))):
      img = pipeline.decode_oversized(encoded(fmt), limit)
      self.assertEqual((img.size, img.mode), (size, "RGB"), fmt)
    with self.assertRaisesRegex(pipeline.ImageTooLargeError,
                                r"400x300 = 120000 pixels > data\.max_image_"
                                r"pixels=40000 \(PNG: only JPEG and JPEG 2000"):
      pipeline.decode_oversized(encoded("PNG"), 40_000)
    with self.assertRaisesRegex(pipeline.ImageTooLargeError,
                                "even at the smallest scale"):
      pipeline.decode_oversized(encoded("JPEG"), 100)


class ConfigCheckTest(absltest.TestCase):

  def test_packaged_configs_pass_and_mistakes_are_named(self):
    for name in config_base.config_names():  # their data paths are the user's
      config = config_base.load_config_file(name)
      config_check.check_keys_and_types(config)
      config_check.check_ranges(config)
      config_check.check_names(config)
      config_check.check_model(config)
    config = train_test.demo_config()
    config_check.check_config(config, "train", device_count=8, process_count=1)
    for key, value, pattern in (
        ("num_train_steps", 0, r"config\.num_train_steps=0: must be > 0"),
        ("masking.ratio", 1.0, r"config\.masking\.ratio=1\.0: must be in \[0, 1\)"),
        ("data.short_caption", "last", r"data\.short_caption='last': use one of"),
        ("eval.datasets", "urban1k,imagenett", r"'imagenett' is not a benchmark"),
        ("data.text_context", 300, r"data\.text_context=300: must be <= the "
                                   r"model's context_length \(248\)"),
        ("mesh.fsdp", 3, r"config\.mesh\.fsdp=3: must divide the 8 devices")):
      bad = train_test.demo_config(**{key: value})
      with self.subTest(key), self.assertRaisesRegex(config_check.ConfigError,
                                                     pattern):
        config_check.check_config(bad, "train", device_count=8, process_count=1)

  def test_model_takes_any_size_field(self):
    # sizes.model_config reads every CLIPConfig field from config.model, so
    # the check accepts them too (the fidelity-size model of BENCHMARKS.md).
    config = train_test.demo_config()
    config.model.vision_layers = 4
    config.model.text_layers = 4
    config.model.image_size = config.data.image_size = 64
    config_check.check_config(config, "train", device_count=8, process_count=1)
    self.assertEqual((sizes.model_config(config).vision_layers,
                      sizes.model_config(config).image_size), (4, 64))
    bad = train_test.demo_config()
    bad.model.vision_layers = "four"  # a new key takes any type in ml_collections
    with self.assertRaisesRegex(config_check.ConfigError,
                                r"config\.model\.vision_layers='four': must be an integer"):
      config_check.check_config(bad, "train", device_count=8, process_count=1)
    config.model.vision_depth = 4
    with self.assertRaisesRegex(config_check.ConfigError,
                                r"config\.model\.vision_depth: no such config key"):
      config_check.check_config(config, "train", device_count=8, process_count=1)

# ----------------------------------------------------------------------------
# The program: SIGTERM during a stalled read, user errors.

def _env(devices=1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.pop("FIXCLIP_DEBUG", None)
  return env


def _main(workdir, *flags, config="configs/demo.py"):
  return [sys.executable, "-m", "fixclip_jax.main", f"--config={config}",
          f"--workdir={workdir}", "--mode=train", *SMALL_FLAGS, *flags]


class ProgramFaultsTest(absltest.TestCase):

  def test_sigterm_during_a_stalled_read_exits_0_quickly_with_a_checkpoint(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    data = os.path.join(root, "data")
    # One batch of good images, then only FIFOs: after step 1 every read
    # stalls (read_timeout_s=60 is far away).
    manifest, _ = write_planned_manifest(data, ["good"] * 8 + ["fifo"] * 16)
    self.addCleanup(release_fifos, data)
    workdir = os.path.join(root, "run")
    proc = subprocess.Popen(
        _main(workdir, "--config.data.type=jsonl",
              f"--config.data.path={manifest}", "--config.num_train_steps=10",
              "--config.checkpoint_every=100", "--config.data.read_timeout_s=60"),
        cwd=_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and '"step": 1' in open(metrics).read():
        break
      time.sleep(0.1)
    time.sleep(1.0)  # the loop now waits for a batch that cannot come
    self.assertIsNone(proc.poll(), "the run ended before the signal")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    took = time.monotonic() - sent
    self.assertEqual(proc.returncode, 0, out[-3000:])
    # Well before the 60 s read timeout it would otherwise wait for; the save and
    # teardown take 3-5 s on a quiet 2-core machine, 10-15 s on a loaded one.
    self.assertLess(took, 30, out[-3000:])
    self.assertEqual(checkpoint.saved_steps(workdir), [1], out[-3000:])
    self.assertIn("Stopped by a signal at step 1; its checkpoint is saved", out)
    report("SIGTERM during a stalled read",
           f"exit 0 after {took:.1f} s, checkpoint of step 1; "
           + next(l for l in out.splitlines() if "Stopped by a signal" in l))

  def test_user_errors_are_one_line_exit_2_nothing_written(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    files = _user_error_files(root)
    cases = [  # (case, flags, pattern of the error line, devices)
        ("config file path", ["--config=configs/nope.py"],
         r"--config=configs/nope\.py: No config file at configs/nope\.py and "
         r"no packaged config of that name \(names: .*demo", 1),
        ("unknown key (config file)", [f"--config={files['unknown_key']}"],
         r"config\.optim\.lrr: no such config key \(did you mean optim\.lr\?\)",
         1),
        ("unknown key (command line)", ["--config.data.globl_batch=8"],
         r"--config\.data\.globl_batch: no such config key \(did you mean "
         r"data\.global_batch\?\)", 1),
        ("wrong type (config file)", [f"--config={files['wrong_type']}"],
         r"--config=.*wrong_type\.py, line 6: TypeError: Could not override "
         r"field 'log_every'", 1),
        ("wrong type None (config file)", [f"--config={files['none_type']}"],
         r"config\.checkpoint_every=None: must be an integer", 1),
        ("checkpoint_every=0", ["--config.checkpoint_every=0"],
         r"config\.checkpoint_every=0: must be > 0", 1),
        ("log_every=0", ["--config.log_every=0"],
         r"config\.log_every=0: must be > 0", 1),
        ("batch not divisible", ["--config.data.global_batch=6"],
         r"config\.data\.global_batch=6: must be divisible by the number of "
         r"devices it is split over \(4: mesh data=4 x fsdp=1\)", 4),
        ("dtype", ["--config.dtype=float64"],
         r"config\.dtype='float64': use one of float32 \| bfloat16 \| float16",
         1),
        ("objective", ["--config.objective=simclr"],
         r"config\.objective='simclr'; use one of clip \| fixclip \| longclip",
         1),
        ("init_from missing", ["--config.init_from=/nonexistent/ckpt.pt"],
         r"config\.init_from='/nonexistent/ckpt\.pt': no such file or folder",
         1),
        ("init_from incompatible", [f"--config.init_from={files['orbax']}"],
         r"parameter text/text_projection has shape \(128, 32\) in the "
         r"checkpoint, model expects \(128, 64\)", 1),
        ("HF config.json a list", [f"--config.init_from={files['hf_list']}"],
         r"config\.json: expected a JSON object .*found list", 1),
        ("HF 3 heads for width 128", [f"--config.init_from={files['hf_heads']}"],
         r"vision_config\.num_attention_heads=3 does not divide "
         r"vision_config\.hidden_size=128", 1),
        ("HF string size", [f"--config.init_from={files['hf_string']}"],
         r"text_config\.hidden_size='128' must be a positive integer", 1),
        ("HF no vision_config", [f"--config.init_from={files['hf_no_vision']}"],
         r"config\.json: no vision_config", 1),
        ("safetensors shape mismatch",
         [f"--config.init_from={files['safetensors']}"],
         r"key 'ln_final\.weight': expected shape \(128,\), found \(100,\)$", 1),
        ("raw-pickle .pt", [f"--config.init_from={files['pickle']}"],
         r"refused: this file needs an arbitrary unpickle .*re-save with "
         r"torch\.save\(state_dict\)", 1),
    ]
    running = []
    for case, flags, pattern, devices in cases:
      config = next((f.split("=", 1)[1] for f in flags
                     if f.startswith("--config=")), "configs/demo.py")
      flags = [f for f in flags if not f.startswith("--config=")]
      workdir = os.path.join(root, f"workdir_{len(running)}")
      while sum(p.poll() is None for *_, p in running) >= 3:
        time.sleep(0.2)  # a few at a time: the machine may have 2 cores
      running.append((case, pattern, workdir, subprocess.Popen(
          _main(workdir, *flags, config=config), cwd=_ROOT, env=_env(devices),
          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    for case, pattern, workdir, proc in running:
      err = proc.communicate(timeout=600)[1]
      with self.subTest(case):
        lines = [l for l in err.splitlines() if l.strip()]
        self.assertEqual(proc.returncode, 2, err[-3000:])
        self.assertNotIn("Traceback", err)
        self.assertLen(lines, 1, err[-3000:])
        self.assertRegex(lines[0], r"^[\w.]+: error: ")
        message = lines[0].split(": error: ", 1)[1].split(" (--debug")[0]
        self.assertRegex(message, pattern)
        self.assertFalse(os.path.exists(workdir), f"{case} wrote {workdir}")
        report(f"user error: {case}", f"{message} [exit {proc.returncode}]")


def _config_file(root, name, body):
  path = os.path.join(root, f"{name}.py")
  with open(path, "w") as f:
    f.write("from fixclip_jax import config_base\n\n\ndef get_config():\n"
            f"  c = config_base.load_config_file('demo')\n  {body}\n"
            "  return c\n")
  return path


def _hf_dir(root, name, config):
  path = os.path.join(root, name)
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return path


def _user_error_files(root):
  """Config files and checkpoints that are wrong in one way each."""
  cfg = sizes.model_config(train_test.demo_config(**SMALL))
  params = jax.device_get(clip.init_params(cfg))
  files = {
      "unknown_key": _config_file(root, "unknown_key", "c.optim.lrr = 0.1"),
      "wrong_type": _config_file(root, "wrong_type", "c.log_every = '10'"),
      "none_type": _config_file(root, "none_type", "c.checkpoint_every = None"),
  }
  # Our own model folder, of a model with another embedding size.
  other = cfg.replace(embed_dim=32)
  files["orbax"] = os.path.join(root, "other_model")
  checkpoint.save_model(files["orbax"], jax.device_get(
      clip.init_params(other)), other)
  hf = layouts.hf_config_dict(cfg.replace(positional_keep=None))
  files["hf_list"] = _hf_dir(root, "hf_list", [hf])
  heads = json.loads(json.dumps(hf))
  heads["vision_config"]["num_attention_heads"] = 3
  files["hf_heads"] = _hf_dir(root, "hf_heads", heads)
  string = json.loads(json.dumps(hf))
  string["text_config"]["hidden_size"] = "128"
  files["hf_string"] = _hf_dir(root, "hf_string", string)
  files["hf_no_vision"] = _hf_dir(root, "hf_no_vision", {
      k: v for k, v in hf.items() if k != "vision_config"})
  # OpenAI-layout safetensors with one tensor of the wrong shape.
  sd = layouts.params_to_openai_state_dict(params, cfg)
  sd["ln_final.weight"] = np.ones((100,), np.float32)
  files["safetensors"] = os.path.join(root, "bad_shape.safetensors")
  safetensors.numpy.save_file(sd, files["safetensors"])
  # A plain pickle (not torch.save of tensors): numpy objects inside.
  files["pickle"] = os.path.join(root, "raw.pt")
  with open(files["pickle"], "wb") as f:
    pickle.dump(layouts.params_to_openai_state_dict(params, cfg), f)
  return files


if __name__ == "__main__":
  absltest.main()
