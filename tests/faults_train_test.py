"""Fault injection (issue 23): nothing non-finite is applied, saved or
loaded; divergence stops the run; one run per workdir; storage faults and
the remaining crashes are one line.

  float knobs          NaN/inf in any float knob is a config error naming it
  overflowing update   finite loss and gradient, non-finite update: skipped
  non-finite state     never saved (the newest good checkpoint stays)
  non-finite weights   refused at load (convert, init_from, api.load), naming
                       the first bad parameter
  divergence           optim.max_skipped_updates skipped updates in a row stop
                       the run: one line, exit 3, the checkpoints kept
  workdir lock         a live holder refuses a second run, naming it; a dead
                       holder's lock is taken over with a warning
  read-only folder     reported at the failing save, not after 300 s
  full disk mid-save   one error line on stderr, the good checkpoint kept
  free space           the estimate is within 1.5x of the checkpoint's size
  user errors          one line, exit 2, nothing written
Each case prints `[fault] CASE: what the user saw` (`pytest -s` shows them).
"""
import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from fixclip_jax import api
from fixclip_jax import checkpoint
from fixclip_jax import cli
from fixclip_jax import config_base
from fixclip_jax import config_check
from fixclip_jax import layouts
from fixclip_jax import loader
from fixclip_jax import train
from fixclip_jax.models import clip
from fixclip_jax.models import sizes
from fixclip_jax.models.sizes import config_to_dict
from tests import faults_test
from tests import train_test

_ROOT = faults_test._ROOT
SMALL = faults_test.SMALL
report = faults_test.report


def _du(directory):
  return sum(os.path.getsize(os.path.join(parent, f))
             for parent, _, files in os.walk(directory) for f in files)


def _dead_pid():
  """The pid of a process that has ended (reaped)."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _finite_leaves(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


# ----------------------------------------------------------------------------
# Config: every float knob finite, heads that divide the width.

class FiniteKnobsTest(absltest.TestCase):

  def test_every_float_knob_nan_or_inf_is_an_error_naming_it(self):
    base = train_test.demo_config()
    floats = [k for k, v in config_check._leaves(base)
              if isinstance(v, float) or (isinstance(v, (tuple, list)) and v and
                                          isinstance(v[0], float))]
    # The list is among them (found generically, not listed).
    for key in ("optim.lr", "optim.new_params_lr", "optim.weight_decay",
                "optim.grad_clip", "optim.eps", "data.read_timeout_s",
                "init_logit_scale", "loss.max_logit_scale", "pretrain77.lr",
                "data.rrc_scale", "loss.gta_weights"):
      self.assertIn(key, floats)
    for key in floats:
      for bad in (float("nan"), float("inf"), float("-inf")):
        value = _get(base, key)
        value = (type(value)([bad] + list(value[1:]))
                 if isinstance(value, (tuple, list)) else bad)
        config = train_test.demo_config(**{key: value})
        with self.subTest(key=key, value=bad), self.assertRaisesRegex(
            config_check.ConfigError, rf"^config\.{key}=.*: must be a finite "
            r"number \(not NaN or infinity\)$"):
          config_check.check_config(config, "train", device_count=8,
                                    process_count=1)
    report("config.optim.lr=nan", "config.optim.lr=nan: must be a finite "
           f"number (checked for {len(floats)} float knobs)")

  def test_heads_that_do_not_divide_the_width(self):
    for key, value, pattern in (
        ("model.vision_heads", 5, r"config\.model\.vision_heads=5: must divide "
                                  r"the vision width \(128"),
        ("model.text_heads", 0, r"config\.model\.text_heads=0: must divide the "
                                r"text width")):
      config = train_test.demo_config(**{key: value})
      with self.subTest(key), self.assertRaisesRegex(config_check.ConfigError,
                                                     pattern):
        config_check.check_config(config, "train", device_count=8,
                                  process_count=1)

  def test_max_skipped_updates_knob(self):
    self.assertEqual(config_base.base_config().optim.max_skipped_updates, 20)
    config = train_test.demo_config(**{"optim.max_skipped_updates": -1})
    with self.assertRaisesRegex(config_check.ConfigError,
                                r"max_skipped_updates=-1: must be >= 0"):
      config_check.check_config(config, "train", device_count=8, process_count=1)


def _get(config, key):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


# ----------------------------------------------------------------------------
# The step and the checkpoints: no NaN/Inf in, none out.

class NonFiniteStateTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

  def test_a_state_with_nan_is_never_saved(self):
    manager = checkpoint.make_train_manager(self.root, keep=1)
    good = {"w": jnp.ones((64,)), "step": jnp.int32(1)}
    checkpoint.save_train_state(manager, 1, good, faults_test._data_iterator(),
                                force=True, wait=True)
    bad = {"w": jnp.ones((64,)).at[3].set(jnp.nan), "step": jnp.int32(2)}
    with self.assertRaisesRegex(
        checkpoint.NonFiniteError, r"Not saving the checkpoint of step 2: the "
        r"train state holds NaN/Inf in w \(1 of 64 values are NaN/Inf\); the "
        r"newest good checkpoint, step 1, is kept") as refused:
      checkpoint.save_train_state(manager, 2, bad, faults_test._data_iterator(),
                                  force=True, wait=True)
    report("NaN train state at save", refused.exception)
    self.assertEqual(checkpoint.saved_steps(self.root), [1])

  def test_non_finite_weights_are_refused_at_load(self):
    cfg = sizes.model_config(train_test.demo_config(**SMALL))
    params = jax.device_get(clip.init_params(cfg))
    sd = layouts.params_to_openai_state_dict(params, cfg)
    sd["visual.proj"] = np.array(sd["visual.proj"])
    sd["visual.proj"][0, 0] = np.nan
    path = os.path.join(self.root, "nan.safetensors")
    safetensors.numpy.save_file(sd, path)
    pattern = (r"nan\.safetensors: parameter visual/proj holds 1 NaN/Inf "
               r"value\(s\) of \d+; these weights are broken")
    with self.assertRaisesRegex(checkpoint.NonFiniteError, pattern):
      loader.load_any(path)
    with self.assertRaisesRegex(checkpoint.NonFiniteError, pattern) as refused:
      api.load(path)
    report("NaN weights (api.load of a .safetensors)", refused.exception)
    # Our own model folder, written past save_model (which refuses them too).
    params["text"]["ln_final"]["scale"] = np.full_like(
        params["text"]["ln_final"]["scale"], np.inf)
    model_dir = os.path.join(self.root, "model")
    with self.assertRaisesRegex(checkpoint.NonFiniteError,
                                r"parameter text/ln_final/scale holds"):
      checkpoint.save_model(model_dir, params, cfg)
    self.assertFalse(os.path.exists(model_dir))
    os.makedirs(model_dir)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(model_dir, checkpoint.PARAMS_SUBDIR), params)
    with open(os.path.join(model_dir, checkpoint.MODEL_CONFIG_FILE), "w") as f:
      json.dump(config_to_dict(cfg), f)
    with self.assertRaisesRegex(checkpoint.NonFiniteError,
                                r"model: parameter text/ln_final/scale holds "
                                r"\d+ NaN/Inf"):
      loader.load_any(model_dir)


class OverflowingUpdateTest(absltest.TestCase):
  """Divergence in a training run (in this process): an infinite learning
  rate makes every update non-finite while the loss and gradient are finite."""

  def test_divergence_stops_the_run_and_keeps_the_good_checkpoints(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    workdir = os.path.join(root, "run")

    def config(**overrides):
      return train_test.demo_config(**{
          **SMALL, "checkpoint_every": 1, "keep_checkpoints": 2,
          "optim.warmup_steps": 0, **overrides})

    # A lock left by a run that was killed: taken over with a warning.
    os.makedirs(workdir)
    with open(os.path.join(workdir, checkpoint.LOCK_FILE), "w") as f:
      json.dump({"pid": _dead_pid(), "host": socket.gethostname(),
                 "started": "2026-01-01T00:00:00+00:00"}, f)
    with self.assertLogs("absl", "WARNING") as logs:
      good = train.train_and_evaluate(config(num_train_steps=2), workdir,
                                      evaluate=False)
    taken = [l for l in logs.output if "Taking over the lock" in l]
    self.assertLen(taken, 1, logs.output)
    report("stale workdir lock", taken[0].split(":absl:", 1)[-1])
    with open(os.path.join(workdir, checkpoint.LOCK_FILE)) as f:
      self.assertEqual(f.read(), "")  # released at the end
    self.assertEqual(checkpoint.saved_steps(workdir), [1, 2])

    # The free-space estimate against the size of the checkpoint it is for.
    estimate = checkpoint.checkpoint_bytes_estimate(good)
    real = _du(os.path.join(workdir, "checkpoints", "2"))
    report("free-space estimate", f"{estimate / 2**20:.1f} MiB for a "
           f"{real / 2**20:.1f} MiB checkpoint ({estimate / real:.2f}x; raw "
           f"arrays {checkpoint.state_nbytes(good) / real:.2f}x)")
    self.assertBetween(estimate / real, 1.0, 1.5)
    step1, _ = checkpoint.load_train_params(workdir, 1)

    # Resume at step 1 with an infinite lr: every update is skipped (the loss
    # and gradients are finite, the new parameters are not); after 3 in a row
    # the run stops. Step 2, of the earlier run, is deleted with a warning.
    with self.assertLogs("absl", "WARNING") as logs:
      with self.assertRaises(train.DivergenceError) as stopped:
        train.train_and_evaluate(
            config(num_train_steps=20, resume_step=1,
                   **{"optim.lr": float("inf"), "optim.max_skipped_updates": 3}),
            workdir, evaluate=False)
    self.assertTrue(any(
        "deleting the later checkpoints [2] of an earlier run" in l
        for l in logs.output), logs.output)
    message = str(stopped.exception)
    self.assertEqual(stopped.exception.exit_code, 3)
    self.assertRegex(message, r"^The run diverged: stopped at step 4 after 3 "
                     r"updates in a row were skipped for NaN/Inf \(steps 2-4; "
                     r"config\.optim\.max_skipped_updates=3\); last finite loss "
                     r"\d+\.\d+ at step 4\. The newest checkpoint, step 4, is "
                     r"kept .*Try a lower --config\.optim\.lr \(now inf\)")
    report("divergence (lr=inf)", message)
    rows = faults_test.metric_rows(workdir)
    self.assertEqual([rows[s]["skipped"] for s in (2, 3, 4)], [1, 1, 1])
    self.assertEqual(checkpoint.saved_steps(workdir), [3, 4])
    # The kept checkpoints hold step 1's weights: skipped updates changed
    # nothing, and nothing non-finite was saved.
    for step in (3, 4):
      params, _ = checkpoint.load_train_params(workdir, step)
      self.assertTrue(_finite_leaves(params))
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(step1)):
        np.testing.assert_array_equal(a, b)
    with open(os.path.join(workdir, checkpoint.LOCK_FILE)) as f:
      self.assertEqual(f.read(), "")  # released on the error too


# ----------------------------------------------------------------------------
# One run per workdir.

class WorkdirLockTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)

  def _hold(self, pid):
    """The lock held as a live run holds it: the OS lock on an open file
    (another open file description) and its record."""
    fd = os.open(os.path.join(self.workdir, checkpoint.LOCK_FILE),
                 os.O_RDWR | os.O_CREAT)
    self.addCleanup(os.close, fd)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": pid, "host": "trainer-7",
                             "started": "2026-12-04T10:00:00+00:00"}).encode())

  def test_a_second_run_is_refused_naming_the_holder(self):
    self._hold(4242)
    before = faults_test.tree_digest(self.workdir)
    with self.assertRaisesRegex(
        checkpoint.WorkdirLockedError, r"is in use by another run \(pid 4242 "
        r"on host trainer-7, started 2026-12-04T10:00:00\+00:00; .*run\.lock\)"
        r"\. Wait for it to end or stop it, or use another --workdir") as refused:
      train.train_and_evaluate(train_test.demo_config(**SMALL), self.workdir,
                               evaluate=False)
    report("second run on a workdir", refused.exception)
    self.assertEqual(faults_test.tree_digest(self.workdir), before)

  def test_live_and_dead_holders_without_an_os_lock(self):
    lock_path = os.path.join(self.workdir, checkpoint.LOCK_FILE)
    sleeper = subprocess.Popen(["sleep", "60"])
    self.addCleanup(sleeper.kill)
    # A file system without flock: the record alone says who holds it.
    with open(lock_path, "w") as f:
      json.dump({"pid": sleeper.pid, "host": socket.gethostname(),
                 "started": "x", "pid_start": checkpoint._process_start(
                     sleeper.pid)}, f)
    with self.assertRaisesRegex(checkpoint.WorkdirLockedError,
                                rf"pid {sleeper.pid} on host"):
      checkpoint.WorkdirLock(self.workdir).acquire()
    # The same pid, reused by another process (another start time): stale.
    with open(lock_path, "w") as f:
      json.dump({"pid": sleeper.pid, "host": socket.gethostname(),
                 "started": "x", "pid_start": "1"}, f)
    lock = checkpoint.WorkdirLock(self.workdir)
    with self.assertLogs("absl", "WARNING"):
      lock.acquire()
    with open(lock_path) as f:
      self.assertEqual(json.load(f)["pid"], os.getpid())
    with self.assertRaises(checkpoint.WorkdirLockedError):  # held: a 2nd fd
      checkpoint.WorkdirLock(self.workdir).acquire()
    lock.release()
    checkpoint.WorkdirLock(self.workdir).acquire()  # free again


# ----------------------------------------------------------------------------
# Storage (a real read-only mount and a real full disk, in a user+mount
# namespace: `unshare -rm`, no root needed where user namespaces are on).

def _unshare_works():
  if not shutil.which("unshare"):
    return False
  return subprocess.run(["unshare", "-rm", "true"], capture_output=True
                        ).returncode == 0


_READ_ONLY_SAVE = textwrap.dedent("""
    import os, subprocess, sys, time
    sys.path.insert(0, {root!r})
    import jax.numpy as jnp
    from fixclip_jax import checkpoint
    from tests import faults_test
    workdir = {workdir!r}
    manager = checkpoint.make_train_manager(workdir, keep=2)
    state = {{"w": jnp.ones((4096,))}}
    checkpoint.save_train_state(manager, 1, state, faults_test._data_iterator(),
                                force=True, wait=True)
    folder = os.path.join(workdir, "checkpoints")
    subprocess.run(["mount", "--bind", folder, folder], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
    start = time.monotonic()
    try:
      checkpoint.save_train_state(manager, 2, state, faults_test._data_iterator(),
                                  force=True, wait=True)
    except checkpoint.CheckpointSaveError as e:
      print("ERROR", round(time.monotonic() - start, 1), e, flush=True)
    print("STEPS", checkpoint.saved_steps(workdir), flush=True)
    os._exit(0)
""")


@absltest.skipUnless(_unshare_works(), "needs `unshare -rm` (user namespaces)")
class StorageFaultsTest(absltest.TestCase):

  def test_read_only_folder_is_named_at_the_failing_save(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    script = _READ_ONLY_SAVE.format(root=_ROOT, workdir=root)
    out = subprocess.run(["unshare", "-rm", sys.executable, "-c", script],
                         cwd=_ROOT, env=faults_test._env(), capture_output=True,
                         text=True, timeout=120).stdout
    error = next((l for l in out.splitlines() if l.startswith("ERROR")), "")
    self.assertRegex(error, r"^ERROR (\d+\.\d+) Cannot save the checkpoint of "
                     r"step 2: .*checkpoints is on a read-only file system "
                     r"\(EROFS\); the newest good checkpoint, step 1, is kept")
    self.assertLess(float(error.split()[1]), 10.0)
    self.assertIn("STEPS [1]", out)
    report("read-only checkpoint folder", error.split(" ", 2)[2])

  def test_a_failed_saves_cause_is_named(self):
    # tensorstore's words for a folder turned read-only during a background
    # save (a 30-minute soak, 2026-12-05), an OSError behind another error,
    # and an error that is neither.
    tensorstore = ValueError(
        'PERMISSION_DENIED: Error writing local file "/w/1116.orbax-checkpoint'
        '-tmp/_sharding": Failed to open: "/w/_sharding.__lock": Read-only '
        "file system [os_error_code='30']")
    self.assertEqual(checkpoint._write_error_words(tensorstore),
                     "is on a read-only file system")
    try:
      try:
        raise OSError(errno.ENOSPC, "No space left on device")
      except OSError as e:
        raise RuntimeError("commit failed") from e
    except RuntimeError as e:
      self.assertEqual(checkpoint._write_error_words(e), "has no space left")
    self.assertIsNone(checkpoint._write_error_words(RuntimeError("timeout")))

  def test_disk_full_during_a_save_is_one_line(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    workdir = os.path.join(root, "disk", "run")
    # 50 MiB: the log, metrics and step 1's checkpoint (~33 MiB) fit, step 2
    # does not; the free-space check is told there is room, so the save
    # itself runs out of space (a disk filled by another process mid-save).
    argv = faults_test._main(workdir, "--config.num_train_steps=3",
                             "--config.checkpoint_every=1")[3:]
    program = textwrap.dedent(f"""
        import runpy, sys
        from fixclip_jax import checkpoint
        checkpoint.free_bytes = lambda directory: 1 << 40
        sys.argv = ["fixclip_jax.main"] + {argv!r}
        runpy.run_module("fixclip_jax.main", run_name="__main__", alter_sys=True)
    """)
    shell = (f"mkdir -p {root}/disk && mount -t tmpfs -o size=50m none "
             f"{root}/disk && exec {sys.executable} -c \"$PROGRAM\"")
    env = dict(faults_test._env(), PROGRAM=program)
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", shell], cwd=_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    self.assertNotIn("Traceback", proc.stderr)
    self.assertNotIn("Logging error", proc.stderr)
    errors = [l for l in err if ": error: " in l]
    self.assertLen(errors, 1, proc.stderr[-3000:])
    self.assertRegex(errors[0], r"Saving the checkpoint of step 2 in .* failed: "
                     r"the folder has no space left; .*the newest good "
                     r"checkpoint, step 1, is kept")
    # Besides it only our warnings (orbax's errors, which it repeats, and
    # tracebacks are in log.txt): was 914 lines with 7 "Logging error" blocks.
    others = [l for l in err if ": error: " not in l]
    self.assertTrue(all(l.startswith("W") for l in others), others)
    self.assertLessEqual(len(others), 2, proc.stderr[-3000:])
    report("disk full mid-save", f"{len(err)} stderr line(s): " +
           " | ".join(l[:300] for l in err))


class ConsoleTest(absltest.TestCase):

  def test_a_log_file_that_cannot_be_written_is_given_up_with_one_line(self):
    # /dev/full: every write fails with ENOSPC, as on a full disk.
    handler = cli.log_to_file("/dev/full")
    self.addCleanup(logging.getLogger().removeHandler, handler)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      for i in range(5):
        logging.getLogger("fixclip_fault").warning("record %d", i)
    lines = [l for l in err.getvalue().splitlines() if l.strip()]
    self.assertNotIn("Logging error", err.getvalue())
    self.assertLen(lines, 1, err.getvalue())
    self.assertRegex(lines[0], r"warning: stopped writing /dev/full: .*No space "
                     r"left on device")
    self.assertNotIn(handler, logging.getLogger().handlers)
    report("log file on a full disk", lines[0])

  def test_a_write_finishing_after_its_event_loop_closed_is_not_a_traceback(self):
    # What a failed save leaves (CI, stop 27: ~130 tracebacks around the
    # error line): a tensorstore future awaited on an asyncio loop that was
    # closed before the write completed.
    import asyncio  # pylint: disable=g-import-not-at-top
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    self.addCleanup(setattr, sys, "unraisablehook", sys.unraisablehook)
    cli.quiet_console()
    promise, future = ts.Promise.new()
    loop = asyncio.new_event_loop()

    async def wait_for_write():
      await future
    task = loop.create_task(wait_for_write())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    logging.getLogger().addHandler(handler)
    self.addCleanup(logging.getLogger().removeHandler, handler)
    self.addCleanup(logging.getLogger().setLevel, logging.getLogger().level)
    logging.getLogger().setLevel(logging.INFO)  # as absl.app.run sets it
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      promise.set_result(1)  # the callback runs here, on this thread
    del task
    self.assertEqual(err.getvalue(), "")
    self.assertIn("Event loop is closed", logged.getvalue())

  def test_a_diverged_run_exits_3_with_one_line(self):
    def main(_):
      raise train.DivergenceError("The run diverged: stopped at step 9")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as ended:
      cli._guarded(main)(["fixclip-train"])
    self.assertEqual(ended.exception.code, 3)
    self.assertRegex(err.getvalue(), r"^[\w.-]+: error: The run diverged: "
                     r"stopped at step 9 \(--debug")
    self.assertLen(err.getvalue().splitlines(), 1)


# ----------------------------------------------------------------------------
# The program: what was a traceback is one line, exit 2, nothing written.

_HIDE_TORCH = ("import runpy, sys; sys.modules['torch'] = None; "
               "sys.argv = ['fixclip_jax.main'] + sys.argv[1:]; "
               "runpy.run_module('fixclip_jax.main', run_name='__main__', "
               "alter_sys=True)")


class ProgramErrorsTest(absltest.TestCase):

  def test_crashes_are_one_line_exit_2_nothing_written(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    files = _bad_files(root)
    cases = [  # (case, flags, pattern of the error line, torch hidden)
        ("lr=nan", ["--config.optim.lr=nan"],
         r"^config\.optim\.lr=nan: must be a finite number", False),
        ("vision_heads=5 (config file)", [f"--config={files['heads']}"],
         r"^config\.model\.vision_heads=5: must divide the vision width", False),
        ("safetensors header a JSON list",
         [f"--config.init_from={files['list_header']}"],
         r"list_header\.safetensors: could not read the safetensors file "
         r"\(truncated or corrupt\?\): its header is a JSON list", False),
        ("broken model.safetensors.index.json",
         [f"--config.init_from={files['hf_index']}"],
         r"hf_index/model\.safetensors\.index\.json: not a valid index of "
         r"weight files \(JSONDecodeError", False),
        (".pt without torch", [f"--config.init_from={files['pt']}"],
         r"weights\.pt: reading a PyTorch file needs PyTorch, which is not "
         r"installed: pip install 'fixclip_jax\[torch\]'", True),
        ("init_from with NaN weights", [f"--config.init_from={files['nan']}"],
         r"nan\.safetensors: parameter text/token_embedding holds 1 "
         r"NaN/Inf value", False),
    ]
    running = []
    for case, flags, pattern, hide_torch in cases:
      workdir = os.path.join(root, f"workdir_{len(running)}")
      config = next((f.split("=", 1)[1] for f in flags
                     if f.startswith("--config=")), "configs/demo.py")
      flags = [f for f in flags if not f.startswith("--config=")]
      argv = faults_test._main(workdir, *flags, config=config)
      if hide_torch:
        argv = [sys.executable, "-c", _HIDE_TORCH] + argv[3:]
      while sum(p.poll() is None for *_, p in running) >= 3:
        time.sleep(0.2)
      running.append((case, pattern, workdir, subprocess.Popen(
          argv, cwd=_ROOT, env=faults_test._env(), stdout=subprocess.DEVNULL,
          stderr=subprocess.PIPE, text=True)))
    for case, pattern, workdir, proc in running:
      err = proc.communicate(timeout=600)[1]
      with self.subTest(case):
        lines = [l for l in err.splitlines() if l.strip()]
        self.assertEqual(proc.returncode, 2, err[-3000:])
        self.assertNotIn("Traceback", err)
        self.assertLen(lines, 1, err[-3000:])
        message = lines[0].split(": error: ", 1)[1].split(" (--debug")[0]
        self.assertRegex(message, pattern)
        self.assertFalse(os.path.exists(workdir), f"{case} wrote {workdir}")
        report(f"user error: {case}", f"{message} [exit {proc.returncode}]")


def _bad_files(root):
  """Checkpoints that are broken in one way each (the demo model's shapes)."""
  cfg = sizes.model_config(train_test.demo_config(**SMALL))
  params = jax.device_get(clip.init_params(cfg))
  sd = layouts.params_to_openai_state_dict(params, cfg)
  files = {"heads": faults_test._config_file(root, "heads",
                                             "c.model.vision_heads = 5")}
  files["list_header"] = os.path.join(root, "list_header.safetensors")
  header = json.dumps([{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}])
  with open(files["list_header"], "wb") as f:
    f.write(len(header).to_bytes(8, "little") + header.encode() + b"\0" * 4)
  files["hf_index"] = os.path.join(root, "hf_index")
  os.makedirs(files["hf_index"])
  with open(os.path.join(files["hf_index"], "config.json"), "w") as f:
    json.dump(layouts.hf_config_dict(cfg.replace(positional_keep=None)), f)
  with open(os.path.join(files["hf_index"], "model.safetensors.index.json"),
            "w") as f:
    f.write('{"weight_map": {"a": "model-00001.safetensors",')  # cut short
  files["pt"] = os.path.join(root, "weights.pt")
  with open(files["pt"], "wb") as f:  # never opened: torch is missing
    f.write(b"PK\x03\x04")
  nan = dict(sd, **{"token_embedding.weight": np.array(
      sd["token_embedding.weight"])})
  nan["token_embedding.weight"][5, 3] = np.nan
  files["nan"] = os.path.join(root, "nan.safetensors")
  safetensors.numpy.save_file(nan, files["nan"])
  return files


if __name__ == "__main__":
  absltest.main()
