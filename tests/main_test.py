"""The entry point end to end: bad config keys, SIGTERM + resume, resume from a
chosen step, eval mode, TensorBoard scalars (issue 6, 7), the console and the
files a run leaves (issue 16)."""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import jax
import numpy as np

from fixclip_jax import loader

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A few seconds per run on CPU: 8 steps of the demo model at batch 8, no
# length buckets (one compiled step, not one per bucket its batches meet).
_SMALL = ["--config.data.global_batch=8", "--config.data.synthetic_num=64",
          "--config.num_train_steps=8", "--config.log_every=1",
          "--config.checkpoint_every=100", "--config.eval_every=0",
          "--config.eval_at_start=False", "--config.eval.synthetic_num=16",
          "--config.eval.batch_size=8", "--config.pretrain77.steps=0",
          "--config.data.long_buckets=()", "--config.data.short_buckets=()"]


def _main(workdir, *extra, mode="train"):
  return [sys.executable, "-m", "fixclip_jax.main", "--config=configs/demo.py",
          f"--workdir={workdir}", f"--mode={mode}", *_SMALL, *extra]


def _run(cmd, timeout=600, cwd=_ROOT):
  return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                        timeout=timeout)


def _run_together(cmds, timeout=600):
  """Each command's CompletedProcess, the processes started side by side
  (independent runs that mostly import; 2 cores do two at once)."""
  procs = [subprocess.Popen(cmd, cwd=_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for cmd in cmds]
  done = []
  for cmd, proc in zip(cmds, procs):
    out, err = proc.communicate(timeout=timeout)
    done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
  return done


# absl's INFO lines start with "I" and the date: "I1125 18:48:35.297 ...".
_INFO_LINE = r"(?m)^I\d{4} "


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

  def test_user_errors_are_one_line_naming_the_thing(self):
    tmp = tempfile.mkdtemp()
    cases = {
        "--config.optim.lrr=0.1": "--config.optim.lrr: no such config key (did you "
                                  "mean optim.lr?)",
        "--config.num_train_steps=many": "flag --config.num_train_steps=many: "
                                         "invalid literal for int()",
        "--config.seed.x=1": "--config.seed.x: seed is a value, not a section",
        "--mode=evaluate": "flag --mode=evaluate: value should be one of",
        "--config=no_such.py": "--config=no_such.py: No config file at no_such.py",
    }
    procs = _run_together([_main(tmp, arg) for arg in cases])
    for (arg, message), proc in zip(cases.items(), procs):
      self.assertEqual(proc.returncode, 2, (arg, proc.stderr[-2000:]))
      self.assertEqual(proc.stderr.count("\n"), 1, proc.stderr)
      self.assertTrue(proc.stderr.startswith("fixclip_jax.main: error: "), proc.stderr)
      self.assertIn(message, proc.stderr)
      self.assertNotIn("Traceback", proc.stderr)
    self.assertFalse(os.listdir(tmp))  # nothing written before the error
    # A missing file met while running: one line too, and --debug (or
    # FIXCLIP_DEBUG=1) brings the traceback back.
    missing = os.path.join(tmp, "missing.pt")
    proc, debug = _run_together([_main(tmp, f"--config.init_from={missing}"),
                                 _main(tmp, f"--config.init_from={missing}", "--debug")])
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertEqual(proc.stderr.count("\n"), 1, proc.stderr)
    self.assertTrue(proc.stderr.startswith("fixclip_jax.main: error: "), proc.stderr)
    self.assertIn(missing, proc.stderr)
    proc = debug
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("Traceback", proc.stderr)
    self.assertIn("FileNotFoundError", proc.stderr)

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
    self.assertIn(f"Resumed from {workdir} at step {saved[-1]}", rerun.stdout)
    p_straight, _, _ = loader.load_any(straight)
    p_resumed, _, _ = loader.load_any(workdir)
    jax.tree.map(np.testing.assert_array_equal, p_straight, p_resumed)

    # Back to the step SIGTERM saved: the later checkpoint (8) goes, training
    # repeats steps saved[-1]+1..8 on the same data and ends where it did.
    again = _run(_main(workdir, f"--config.resume_step={saved[-1]}"))
    self.assertEqual(again.returncode, 0, again.stderr[-3000:])
    self.assertIn(f"Deleted the checkpoints after step {saved[-1]}: [8]", again.stdout)
    self.assertIn(f"Resumed from {workdir} at step {saved[-1]}", again.stdout)
    p_again, _, _ = loader.load_any(workdir)
    jax.tree.map(np.testing.assert_array_equal, p_straight, p_again)
    bad = _run(_main(workdir, "--config.resume_step=5000"))
    self.assertEqual(bad.returncode, 2)
    self.assertIn("config.resume_step=5000: no such checkpoint", bad.stderr)

    # TensorBoard event files hold the training scalars and the config.
    scalars = _tfevent_scalars(os.path.join(straight, "tensorboard"))
    for tag in ("loss", "loss_long", "loss_short", "lr", "grad_norm", "images_per_s"):
      self.assertLen(scalars.get(tag, []), 8, tag)
    self.assertIn("config/text_summary", scalars)

    # --mode=eval on that checkpoint writes the JSON, the table and the plot.
    ev = _run(_main(straight, mode="eval"))
    self.assertEqual(ev.returncode, 0, ev.stderr[-3000:])
    results = json.load(open(os.path.join(straight, "eval_results.json")))["results"]
    self.assertEqual({r["protocol"] for r in results},
                     {"synthetic-late", "synthetic-long", "synthetic-long77",
                      "synthetic-short"})
    self.assertIn("synthetic-long", open(os.path.join(straight, "eval_results.md")).read())
    self.assertGreater(os.path.getsize(os.path.join(straight, "eval_recall.png")), 1000)
    self.assertIn("| 8 | synthetic-long |", ev.stdout)
    self.assertEqual(ev.stdout.strip().splitlines()[-1],
                     f"Report: {straight}/eval_results.md")


class ConsoleTest(absltest.TestCase):

  def test_demo_console_and_workdir_files(self):
    # The demo's shape (two stages, progress every 2 steps, evaluations at the
    # end of each, so as many lines as the real demo), a few seconds long;
    # from another directory, the config by name.
    cwd, workdir = tempfile.mkdtemp(), os.path.join(tempfile.mkdtemp(), "demo")
    demo = _run([sys.executable, "-m", "fixclip_jax.main", "--config=demo",
                 f"--workdir={workdir}", "--config.pretrain77.steps=4",
                 "--config.num_train_steps=4", "--config.log_every=2",
                 "--config.checkpoint_every=12", "--config.data.global_batch=8",
                 "--config.data.synthetic_num=64", "--config.eval.synthetic_num=16",
                 "--config.eval.batch_size=8"], cwd=cwd)
    self.assertEqual(demo.returncode, 0, demo.stderr[-3000:])
    lines = demo.stdout.strip().splitlines()
    print(f"demo stdout, {len(lines)} lines:\n{demo.stdout}")
    self.assertLess(len(lines), 30)
    self.assertTrue(lines[0].startswith(
        "Config demo: tiny model, objective fixclip, 248-token text, 4 steps x "
        "batch 8, after 4 steps of a 77-token CLIP start -> "), lines[0])
    self.assertTrue(lines[1].startswith("Stage 1 of 2: plain CLIP at 77 tokens, "
                                        "4 steps"), lines[1])
    self.assertTrue(lines[2].startswith("[1/4] loss="), lines[2])
    self.assertIn("(first step: includes compilation)", lines[2])
    self.assertIn("Stage 2 of 2: fixclip at 248 tokens from the 77-token start, "
                  "4 steps", lines)
    table = [l for l in lines if l.startswith("|")]
    self.assertEqual(table[0], "| model | step | benchmark | I2T R@1 | I2T R@10 | "
                     "T2I R@1 | T2I R@10 |")
    # The start and the result, each on the late twins, long, long cut to 77
    # and short.
    self.assertEqual([row.split(" | ")[:3] for row in table[2:]], [
        ["| CLIP-77 (start)", "4", "synthetic-late"],
        ["| CLIP-77 (start)", "4", "synthetic-long"],
        ["| CLIP-77 (start)", "4", "synthetic-long77"],
        ["| CLIP-77 (start)", "4", "synthetic-short"],
        ["| tiny", "4", "synthetic-late"],
        ["| tiny", "4", "synthetic-long"], ["| tiny", "4", "synthetic-long77"],
        ["| tiny", "4", "synthetic-short"]])
    with open(os.path.join(workdir, "config.json")) as f:
      self.assertEqual(json.load(f)["init_from"], os.path.join(workdir, "pretrain77"))
    self.assertEqual(lines[-1], f"Report: {workdir}/eval_results.md")
    self.assertTrue(lines[-2].startswith("TensorBoard: "))
    self.assertTrue(lines[-3].startswith("Plots: "))
    for path in lines[-3][len("Plots: "):].split(", "):
      self.assertTrue(os.path.isfile(path), path)
    self.assertIn(os.path.join(workdir, "train_curves.png"), lines[-3])
    # No library (or other) INFO logs on the console; they are in log.txt.
    self.assertNotRegex(demo.stdout + demo.stderr, _INFO_LINE)
    with open(os.path.join(workdir, "log.txt")) as f:
      log = f.read()
    self.assertRegex(log, _INFO_LINE)
    self.assertIn("checkpoint_manager.py", log)  # orbax's
    self.assertIn(lines[0], log)
    self.assertTrue(os.path.isfile(os.path.join(workdir, "config.json")))
    # Files get the usual modes (0644 / 0755 under umask 022).
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "eval_results.md", "train_curves.png", "log.txt"):
      mode = os.stat(os.path.join(workdir, name)).st_mode & 0o777
      self.assertEqual(mode, 0o666 & ~umask, name)
    self.assertFalse(re.search(r"\bI\d{4}\b", demo.stdout))


if __name__ == "__main__":
  absltest.main()
