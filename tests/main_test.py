"""The entry point end to end: bad config keys, SIGTERM + resume, eval mode,
TensorBoard scalars (issue 6, 7)."""
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import jax
import numpy as np

from fixclip_jax import convert

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A few seconds per run on CPU: 8 steps of the demo model at batch 8.
_SMALL = ["--config.data.global_batch=8", "--config.data.synthetic_num=64",
          "--config.num_train_steps=8", "--config.log_every=1",
          "--config.checkpoint_every=100", "--config.eval_every=0",
          "--config.eval_at_start=False", "--config.eval.synthetic_num=16",
          "--config.eval.batch_size=8"]


def _main(workdir, *extra, mode="train"):
  return [sys.executable, "-m", "fixclip_jax.main", "--config=configs/demo.py",
          f"--workdir={workdir}", f"--mode={mode}", *_SMALL, *extra]


def _run(cmd, timeout=600):
  return subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True,
                        timeout=timeout)


def _tfevent_scalars(directory):
  """{tag: [values]} from TensorBoard event files (TFRecord of Event protos)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for name in os.listdir(directory):
    if "tfevents" not in name:
      continue
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        scalars.setdefault(v.tag, []).append(v.simple_value)
  return scalars


class MainTest(absltest.TestCase):

  def test_imports_start_no_jax_backend(self):
    # jax.distributed.initialize() must run before any JAX computation; main.py
    # calls it after the config file and before the training modules load.
    code = ("import importlib.util\n"
            "spec = importlib.util.spec_from_file_location('c', 'configs/fixclip_b16.py')\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "m.get_config()\n"
            "import fixclip_jax.main, fixclip_jax.train, fixclip_jax.convert\n"
            "import fixclip_jax.evaluation.run, fixclip_jax.tools.bench\n"
            "from jax._src import xla_bridge\n"
            "print('backends', len(xla_bridge._backends))\n")
    out = _run([sys.executable, "-c", code])
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])
    self.assertIn("backends 0", out.stdout)

  def test_wrong_config_key_and_type_name_the_key(self):
    tmp = tempfile.mkdtemp()
    bad_key = _run(_main(tmp, "--config.optim.lrr=0.1"))
    self.assertNotEqual(bad_key.returncode, 0)
    self.assertIn("lrr", bad_key.stderr)
    bad_type = _run(_main(tmp, "--config.num_train_steps=many"))
    self.assertNotEqual(bad_type.returncode, 0)
    self.assertIn("num_train_steps", bad_type.stderr)
    self.assertFalse(os.listdir(tmp))  # nothing written before the error

  def test_sigterm_then_rerun_equals_uninterrupted_run(self):
    straight = tempfile.mkdtemp()
    done = _run(_main(straight))
    self.assertEqual(done.returncode, 0, done.stderr[-3000:])

    workdir = tempfile.mkdtemp()
    proc = subprocess.Popen(_main(workdir), cwd=_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
        break
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    self.assertEqual(proc.returncode, 0, log[-3000:])
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                   if d.isdigit())
    self.assertTrue(saved, log[-3000:])
    self.assertLess(saved[-1], 8, "SIGTERM should stop the run early")
    print(f"SIGTERM: stopped and saved at step {saved[-1]}")

    rerun = _run(_main(workdir))
    self.assertEqual(rerun.returncode, 0, rerun.stderr[-3000:])
    self.assertIn(f"Resumed from {workdir} at step {saved[-1]}", rerun.stderr)
    p_straight, _, _ = convert.load_any(straight)
    p_resumed, _, _ = convert.load_any(workdir)
    jax.tree.map(np.testing.assert_array_equal, p_straight, p_resumed)

    # TensorBoard event files hold the training scalars.
    scalars = _tfevent_scalars(os.path.join(straight, "tensorboard"))
    for tag in ("loss", "loss_long", "loss_short", "lr", "grad_norm", "images_per_s"):
      self.assertLen(scalars.get(tag, []), 8, tag)

    # --mode=eval on that checkpoint writes the JSON, the table and the plot.
    ev = _run(_main(straight, mode="eval"))
    self.assertEqual(ev.returncode, 0, ev.stderr[-3000:])
    results = json.load(open(os.path.join(straight, "eval_results.json")))["results"]
    self.assertEqual({r["protocol"] for r in results},
                     {"synthetic-long", "synthetic-short"})
    self.assertIn("synthetic-long", open(os.path.join(straight, "eval_results.md")).read())
    self.assertGreater(os.path.getsize(os.path.join(straight, "eval_recall.png")), 1000)


if __name__ == "__main__":
  absltest.main()
