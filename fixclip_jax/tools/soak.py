"""Soak: a training run killed at random moments loses nothing.

  python -m fixclip_jax.tools.soak --minutes=30 --workdir=/tmp/soak [--seed=0]
      [--steps=N] [--checkpoint_every=K] [--faults=kill,kill_midsave,...]

The command line runs rounds (run_rounds): one soak after another in
WORKDIR/round_K, each given the time left (at least 2 minutes), until --minutes
are spent.

A small training run (configs/demo.py shrunk to CLIP's objective at 77
tokens, tiny model, batch 8, no 77-token stage; `TRAINER_FLAGS`) on a JSONL
manifest that holds bad records next to good images (`BAD_RECORDS`: a
truncated PNG, a missing file, a line that is not JSON, an "image" that is a
number, a directory, a FIFO that never gets a writer (read_timeout), a
20000x1 PNG (image_too_large), an empty caption; and a 16-bit PNG, which is
good data) is run twice as `python -m fixclip_jax.main` subprocesses:

  reference   once, uninterrupted;
  soak        over and over in another workdir for about --minutes, each
              trainer hit by one fault (`FAULTS`), then resumed, until one
              finally runs to the last step untouched.

Faults (--min_faults at least, then while the time left covers a last start
and the remaining steps; in --faults' order first, then at random):
  kill          SIGKILL at a random moment (within two checkpoint intervals
                after the trainer's first save: each kill leaves progress)
  kill_midsave  SIGKILL while orbax writes a checkpoint (after a first save;
                its tmp folder is there: `mid_save` records that it still
                was right after the signal)
  term          SIGTERM at a random moment: the trainer saves and exits 0
  term_midsave  SIGTERM during a save
  readonly      the checkpoint folder turns read-only while the trainer runs,
                until it exits (or ~40 s; then SIGKILL, reported), then
                writable again
  readonly_start  the workdir is read-only when a trainer starts: it must
                refuse with one line (exit != 0), then writable again
  diskfull      the workdir's file system fills up while the trainer runs
                (another process's file takes all free space), until the
                trainer exits (or ~40 s), then the file goes
How: as root (this tool's usual home: a container) the soak workdir is a
tmpfs of SOAK_FS_MB mounted for the soak, and its checkpoint folder a bind
mount of itself: `mount -o remount,ro` is a real read-only file system (root
ignores chmod), and filling the tmpfs is a real ENOSPC. (The whole tmpfs
cannot turn read-only mid-run: the trainer holds metrics.jsonl open for
writing, and Linux refuses to remount a file system with writers read-only;
the checkpoint folder has writers only during a save.) Without root (or
mount) the read-only spells use chmod (effective for a non-root user) and
diskfull is skipped, said so in the table.

Checks (exit status 1 if one fails): the soak's final parameters equal the
reference's bit for bit; metrics.jsonl has every train step and no broken
line, and each of its loss values equals the reference's at that step; the
final skip totals per reason equal the reference's; no step is logged twice
(a resumed trainer cuts the rows a killed one wrote after its last
checkpoint: metrics.drop_rows_after). A table (markdown) says what
happened; WORKDIR/soak_report.json has it all, WORKDIR/logs each trainer's
output, WORKDIR/soak_files the soak workdir without its checkpoints. The
persistent XLA cache (WORKDIR/jax_cache) makes a restart's compilation a
cache read.
"""
import dataclasses
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import flags
import jax
import numpy as np
from PIL import Image

from fixclip_jax import checkpoint
from fixclip_jax import cli
from fixclip_jax import metrics as metrics_lib
from fixclip_jax.data import synthetic

FAULTS = ("kill", "kill_midsave", "term", "term_midsave", "readonly",
          "readonly_start", "diskfull")
# A bad record kind -> the pipeline's skip reason (None: good data).
BAD_RECORDS = {
    "truncated_png": "unreadable_image", "missing_file": "missing_file",
    "not_json": "bad_record", "image_int": "bad_record",
    "directory": "unreadable_file", "fifo": "read_timeout",
    "thin_20000x1": "image_too_large", "empty_caption": "empty_caption",
    "png_16bit": None}
GOOD_RECORDS = 55  # with the 9 above: 64 lines, 8 batches of 8 an epoch
SOAK_FS_MB = 320  # the soak workdir's tmpfs (3 kept checkpoints of ~32 MB)
SPELL_MAX_S = 40.0  # a read-only / disk-full spell waits this long for an exit
EXIT_WAIT_S = 90.0  # a signalled trainer must be gone by then (else SIGKILL)
# The demo config shrunk: CLIP's objective at 77 tokens, one compiled step.
TRAINER_FLAGS = (
    "--config=demo", "--mode=train", "--config.objective=clip",
    "--config.model.num_prompts=0", "--config.model.mask_token=False",
    "--config.model.gta_groups=0", "--config.model.context_length=77",
    "--config.data.text_context=77", "--config.data.short_context=77",
    "--config.data.long_buckets=()", "--config.data.short_buckets=()",
    "--config.optim.frozen_regex=", "--config.optim.new_params_regex=",
    "--config.optim.warmup_steps=2", "--config.eval_at_start=False",
    "--config.eval_every=0", "--config.log_every=1",
    "--config.pretrain77.steps=0", "--config.data.global_batch=8",
    "--config.data.type=jsonl", "--config.data.read_timeout_s=2",
    "--config.data.max_image_pixels=50000", "--config.keep_checkpoints=3")


class SoakError(RuntimeError):
  """The soak could not go on (the reference failed, trainers save nothing)."""


# One soak's default length (--steps sets it; --minutes bounds the faulting):
# 8 a minute ran out after 12 of 30 minutes, 100 took 24.1 (2 cores, the
# reference beside the trainers); about half the time goes to restarts.
STEPS_PER_MINUTE = 125


# ----------------------------------------------------------------------------
# The data: good synthetic scenes and the bad records, one manifest.

def _png16_gray(size: int) -> bytes:
  """A 16-bit grayscale PNG (PIL writes mode I;16 as 16-bit)."""
  ramp = (np.arange(size * size).reshape(size, size) * 37 % 65536)
  buf = io.BytesIO()
  Image.fromarray(ramp.astype(np.uint16)).save(buf, format="PNG")
  return buf.getvalue()


def make_data(root: str, seed: int = 0) -> str:
  """ROOT/manifest.jsonl: GOOD_RECORDS scenes and one line per BAD_RECORDS
  kind, mixed in a fixed order; returns its path."""
  os.makedirs(root, exist_ok=True)
  lines = []
  for i, ex in enumerate(synthetic.synthetic_examples(GOOD_RECORDS, 48, seed)):
    name = f"good_{i:03d}.png"
    with open(os.path.join(root, name), "wb") as f:
      f.write(ex["image"])
    lines.append({"image": name, "caption": ex["caption"],
                  "short_caption": ex.get("short_caption")})
  caption = "A picture with a few shapes. Nothing else is in it."
  for kind in BAD_RECORDS:
    name = f"bad_{kind}.png"
    path = os.path.join(root, name)
    line = {"image": name, "caption": caption}
    if kind == "truncated_png":
      with open(path, "wb") as f:
        f.write(synthetic.synthetic_examples(1, 48, seed + 1)[0]["image"][:90])
    elif kind == "not_json":
      line = "{not json"
    elif kind == "image_int":
      line["image"] = 123
    elif kind == "directory":
      os.makedirs(path, exist_ok=True)
    elif kind == "fifo":
      if not os.path.exists(path):
        os.mkfifo(path)  # open() waits for a writer that never comes
    elif kind == "thin_20000x1":
      Image.new("L", (20000, 1), 128).save(path, format="PNG")
    elif kind == "empty_caption":
      Image.new("RGB", (40, 40), (90, 20, 200)).save(path, format="PNG")
      line["caption"] = "   "
    elif kind == "png_16bit":
      with open(path, "wb") as f:
        f.write(_png16_gray(40))
    lines.append(line)
  random.Random(seed).shuffle(lines)
  path = os.path.join(root, "manifest.jsonl")
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return path


# ----------------------------------------------------------------------------
# The soak workdir's storage: a tmpfs (root) or a plain folder (chmod).

def _run(*cmd: str) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, capture_output=True, text=True, check=False)


class Storage:
  """The soak workdir and the faults done to it (see the module docstring)."""

  def __init__(self, path: str):
    self.path = path
    self.checkpoints = os.path.join(path, checkpoint.TRAIN_CHECKPOINT_SUBDIR)
    self.mounts: List[str] = []  # unmounted in reverse order by close()
    self.filler = os.path.join(path, ".soak_filler")
    os.makedirs(path, exist_ok=True)
    self.tmpfs = (os.geteuid() == 0 and not os.listdir(path) and
                  _run("mount", "-t", "tmpfs", "-o", f"size={SOAK_FS_MB}m",
                       "tmpfs", path).returncode == 0)
    if self.tmpfs:
      self.mounts.append(path)
    self.how = ("tmpfs: remount read-only, ENOSPC by a filler file"
                if self.tmpfs else "plain folder: chmod a-w; no disk-full")

  def can(self, fault: str) -> bool:
    if fault == "diskfull":
      return self.tmpfs
    if fault in ("readonly", "readonly_start"):
      return self.tmpfs or os.geteuid() != 0
    return True

  def bind_checkpoints(self) -> None:
    """The checkpoint folder its own mount (a trainer is not running)."""
    if (self.tmpfs and self.checkpoints not in self.mounts
        and os.path.isdir(self.checkpoints)):
      if _run("mount", "--bind", self.checkpoints,
              self.checkpoints).returncode == 0:
        self.mounts.append(self.checkpoints)

  def read_only(self, target: str, deadline: float) -> bool:
    """Makes `target` (a mount of ours, or a folder) read-only; a mount
    with a file open for writing (a save under way) is retried until
    `deadline`. Whether it worked."""
    while time.monotonic() < deadline:
      if self.tmpfs:
        if target in self.mounts and _run(
            "mount", "-o", "remount,ro" + (",bind" if target != self.path
                                           else ""), target).returncode == 0:
          return True
      else:
        for parent, dirs, _ in os.walk(target):
          for d in [parent] + [os.path.join(parent, x) for x in dirs]:
            os.chmod(d, 0o555)
        return True
      time.sleep(0.02)
    return False

  def writable(self, target: str) -> None:
    if self.tmpfs:
      if target in self.mounts:
        _run("mount", "-o", "remount,rw" + (",bind" if target != self.path
                                            else ""), target)
    else:
      for parent, dirs, _ in os.walk(target):
        for d in [parent] + [os.path.join(parent, x) for x in dirs]:
          os.chmod(d, 0o755)

  def fill(self) -> int:
    """Takes all free space of the tmpfs; the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with open(self.filler, "wb") as f:
      try:
        while True:
          f.write(chunk)
          f.flush()
          written += len(chunk)
      except OSError as e:
        if e.errno != errno.ENOSPC:
          raise
    return written

  def free(self) -> None:
    if os.path.exists(self.filler):
      os.remove(self.filler)

  def close(self) -> None:
    self.free()
    for target in reversed(self.mounts):
      if _run("umount", target).returncode != 0:
        _run("umount", "-l", target)
    self.mounts = []


# ----------------------------------------------------------------------------
# One trainer.

@dataclasses.dataclass
class Attempt:
  fault: str          # FAULTS name, "reference" or "final"
  rc: Optional[int] = None
  seconds: float = 0.0
  start_step: int = 0  # the newest saved step when it started
  end_step: int = 0   # ... and when it ended
  mid_save: bool = False  # a checkpoint's tmp folder was there at the signal
  last_line: str = ""  # the last line of its stderr/stdout
  note: str = ""
  error_line: str = ""  # its "error:" line (cli.fail), if any
  took_over_lock: bool = False  # it took over a lock a killed trainer left
  output_lines: int = 0  # lines of stdout + stderr in all
  note_startup_s: float = 0.0  # (the reference: its start-up time...
  note_step_s: float = 0.0  # ... and step time)


def trainer_env(cache_dir: str) -> Dict[str, str]:
  env = dict(os.environ)
  env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=1",
              "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache_dir,
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  env.pop("FIXCLIP_DEBUG", None)
  return env


def trainer_command(workdir: str, manifest: str, steps: int,
                    checkpoint_every: int) -> List[str]:
  return [sys.executable, "-m", "fixclip_jax.main", f"--workdir={workdir}",
          *TRAINER_FLAGS, f"--config.data.path={manifest}",
          f"--config.num_train_steps={steps}",
          f"--config.checkpoint_every={checkpoint_every}"]


def _saving(checkpoints: str) -> bool:
  """Whether orbax is writing a step (its tmp folder is there)."""
  try:
    return any("tmp" in name for name in os.listdir(checkpoints))
  except OSError:
    return False


def _newest_step(workdir: str) -> int:
  try:
    steps = checkpoint.saved_steps(workdir)
  except Exception:  # pylint: disable=broad-except  # a folder mid-change
    return 0
  return max(steps) if steps else 0


def _metrics_size(workdir: str) -> int:
  try:
    return os.path.getsize(os.path.join(workdir, metrics_lib.METRICS_FILE))
  except OSError:
    return 0


def _error_line(log_path: str) -> tuple:
  """(the last "PROGRAM: error: ..." line or "", the number of lines)."""
  try:
    with open(log_path, errors="replace") as f:
      lines = f.read().splitlines()
  except OSError:
    return "", 0
  errors = [l for l in lines if ": error: " in l and not l.startswith(" ")]
  return (errors[-1] if errors else ""), len(lines)


def _last_line(log_path: str) -> str:
  try:
    with open(log_path, errors="replace") as f:
      lines = [l.strip() for l in f if l.strip()]
  except OSError:
    return ""
  return lines[-1] if lines else ""


class Trainer:
  """One `python -m fixclip_jax.main` subprocess, its own process group."""

  def __init__(self, command: Sequence[str], env: Dict[str, str],
               log_path: str, cwd: str):
    self.log_path = log_path
    self._log = open(log_path, "w")
    self.proc = subprocess.Popen(list(command), env=env, cwd=cwd,
                                 stdout=self._log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    self.started = time.monotonic()

  def alive(self) -> bool:
    return self.proc.poll() is None

  def signal(self, sig: int) -> None:
    if not self.alive():
      return
    if sig == signal.SIGKILL:  # the whole group: nothing of it survives
      os.killpg(self.proc.pid, sig)
    else:
      self.proc.send_signal(sig)

  def wait(self, timeout: float) -> Optional[int]:
    try:
      return self.proc.wait(timeout=max(timeout, 0.0))
    except subprocess.TimeoutExpired:
      return None

  def finish(self, timeout: float = EXIT_WAIT_S) -> int:
    rc = self.wait(timeout)
    if rc is None:
      self.signal(signal.SIGKILL)
      rc = self.proc.wait()
    self._log.close()
    return rc


def _wait_until(condition: Callable[[], bool], trainer: Trainer,
                timeout: float, poll_s: float = 0.02) -> bool:
  """condition() while the trainer lives, within timeout."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and trainer.alive():
    if condition():
      return True
    time.sleep(poll_s)
  return False


# ----------------------------------------------------------------------------
# Checks.

def compare_params(workdir_a: str, workdir_b: str) -> Dict[str, Any]:
  """Final params of two workdirs, bit for bit (raw bytes of every array)."""
  flat = []
  for workdir in (workdir_a, workdir_b):
    params, _ = checkpoint.load_train_params(workdir)
    flat.append({jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf
                 in jax.tree_util.tree_leaves_with_path(params)})
  a, b = flat
  differ = [k for k in sorted(set(a) | set(b))
            if k not in a or k not in b or a[k].dtype != b[k].dtype
            or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
  return {"equal": not differ, "leaves": len(a),
          "values": int(sum(v.size for v in a.values())), "differ": differ[:5]}


def metrics_rows(workdir: str) -> List[Dict[str, Any]]:
  """Every line of metrics.jsonl (a line that is not JSON: {"broken": text})."""
  rows = []
  path = os.path.join(workdir, metrics_lib.METRICS_FILE)
  with open(path, errors="replace") as f:
    for line in f:
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          rows.append({"broken": line[:200]})
  return rows


def check_metrics(soak_dir: str, reference_dir: str, steps: int
                  ) -> Dict[str, Any]:
  """Train rows (those with a loss) of the soak against the reference."""
  rows = metrics_rows(soak_dir)
  ref = {r["step"]: r for r in metrics_rows(reference_dir) if "loss" in r}
  train = [r for r in rows if "loss" in r]
  counts: Dict[int, int] = {}
  for r in train:
    counts[r["step"]] = counts.get(r["step"], 0) + 1
  twice = sorted(s for s, n in counts.items() if n > 1)
  # A replayed step's rows (and every step's last row) against the reference.
  loss_differs = sorted({r["step"] for r in train if r["step"] in ref
                         and r["loss"] != ref[r["step"]]["loss"]})
  last = {r["step"]: r for r in train}
  skips = {k: v for k, v in last.get(steps, {}).items()
           if k.startswith("data/skipped_")}
  ref_skips = {k: v for k, v in ref.get(steps, {}).items()
               if k.startswith("data/skipped_")}
  return {
      "steps_logged": len(counts), "steps": steps,
      "missing": sorted(set(range(1, steps + 1)) - set(counts))[:10],
      "logged_twice": len(twice), "twice_steps": twice[:20],
      "broken_lines": sum("broken" in r for r in rows),
      "broken_examples": [r["broken"] for r in rows if "broken" in r][:3],
      "loss_differs": loss_differs[:10],
      "skips": skips, "skips_equal": skips == ref_skips and bool(skips),
      "skipped_total": int(sum(skips.values())),
  }


# ----------------------------------------------------------------------------
# The soak.

def _attempt(storage: Storage, fault: str, command: List[str],
             env: Dict[str, str], log_path: str, rng: random.Random,
             window_s: float, cwd: str, say: Callable[[str], None]
             ) -> Attempt:
  """One trainer hit by `fault` (or none: "final"); waits for its end.

  Random moments fall within `window_s` after this trainer's first saved
  checkpoint, so every kill leaves progress behind (a soak ends); kills at a
  save wait for the trainer's second save for the same reason.
  """
  workdir = storage.path
  attempt = Attempt(fault, start_step=_newest_step(workdir))
  started = time.monotonic()
  ro_target = None
  if fault == "readonly_start":
    ro_target = storage.path
    if not storage.read_only(ro_target, time.monotonic() + 10):
      attempt.note = "could not make the workdir read-only"
      ro_target = None
  trainer = Trainer(command, env, log_path, cwd)
  size0 = _metrics_size(workdir)
  stepped = lambda: _metrics_size(workdir) > size0
  saved = lambda: _newest_step(workdir) > attempt.start_step
  signals = {"kill": signal.SIGKILL, "kill_midsave": signal.SIGKILL,
             "term": signal.SIGTERM, "term_midsave": signal.SIGTERM}
  try:
    if fault == "final":
      attempt.rc = trainer.finish(timeout=24 * 3600)
    elif fault == "readonly_start":
      attempt.rc = trainer.finish(timeout=SPELL_MAX_S * 3)
    elif not _wait_until(stepped if fault.startswith("term") else saved,
                         trainer, 900):
      attempt.note = "ended before its first step or save"
      attempt.rc = trainer.finish()
    elif fault in ("kill", "term"):
      time.sleep(rng.uniform(0.0, window_s))
      attempt.mid_save = _saving(storage.checkpoints)
      trainer.signal(signals[fault])
      attempt.rc = trainer.finish()
    elif fault in ("kill_midsave", "term_midsave"):
      if _wait_until(lambda: _saving(storage.checkpoints), trainer, 300,
                     poll_s=0.005):
        trainer.signal(signals[fault])
        attempt.mid_save = _saving(storage.checkpoints)
      else:
        attempt.note = "no save seen"
      attempt.rc = trainer.finish()
    elif fault in ("readonly", "diskfull"):
      time.sleep(rng.uniform(0.0, window_s))
      spell_start = time.monotonic()
      notes = []
      if fault == "readonly":
        ro_target = (storage.checkpoints if storage.tmpfs else storage.path)
        if not storage.read_only(ro_target, spell_start + SPELL_MAX_S):
          notes.append("the checkpoint folder stayed busy")
          ro_target = None
      else:
        notes.append(f"filled {storage.fill() >> 20} MB")
      rc = trainer.wait(SPELL_MAX_S - (time.monotonic() - spell_start))
      if rc is None:
        notes.append(f"still running after {SPELL_MAX_S:.0f} s of the spell: "
                     "SIGKILL")
        trainer.signal(signal.SIGKILL)
      else:
        notes.append(f"exited {time.monotonic() - spell_start:.1f} s into "
                     "the spell")
      attempt.note = "; ".join(notes)
      attempt.rc = trainer.finish()
    else:
      raise ValueError(f"Unknown fault {fault!r}; known: {FAULTS}")
  finally:
    if trainer.alive():
      trainer.signal(signal.SIGKILL)
      trainer.finish()
    if ro_target is not None:
      storage.writable(ro_target)
    if fault == "diskfull":
      storage.free()
  attempt.seconds = time.monotonic() - started
  attempt.end_step = _newest_step(workdir)
  attempt.last_line = _last_line(log_path)
  attempt.error_line, attempt.output_lines = _error_line(log_path)
  with open(log_path, errors="replace") as f:
    attempt.took_over_lock = "Taking over the lock" in f.read()
  say(f"  {fault:15s} rc={attempt.rc} {attempt.seconds:5.1f} s, saved step "
      f"{attempt.start_step} -> {attempt.end_step}"
      f"{' (mid-save)' if attempt.mid_save else ''}"
      f"{'; ' + attempt.note if attempt.note else ''}: "
      f"{(attempt.error_line or attempt.last_line)[:150]}"
      f"{f' ({attempt.output_lines} output lines)' if attempt.error_line else ''}")
  return attempt


def run_soak(workdir: str, minutes: float, *, steps: Optional[int] = None,
             checkpoint_every: Optional[int] = None, seed: int = 0,
             faults: Sequence[str] = FAULTS, min_faults: int = 1,
             say: Callable[[str], None] = print) -> Dict[str, Any]:
  """The soak (see the module docstring); its report (also written to
  WORKDIR/soak_report.json).

  The reference runs alongside the soak's trainers (on a machine shared with
  other jobs two processes get more of it than one; the results do not
  depend on timing). Faults go on, each kind once first, while the time
  left covers a last start and the remaining steps.
  """
  unknown = [f for f in faults if f not in FAULTS]
  if unknown:
    raise ValueError(f"Unknown fault(s) {unknown}; known: {FAULTS}")
  began = time.monotonic()
  budget = minutes * 60.0
  steps = steps or max(16, int(round(minutes * STEPS_PER_MINUTE)))
  checkpoint_every = checkpoint_every or max(2, steps // 40)
  rng = random.Random(seed)
  root = os.path.abspath(workdir)
  if os.path.exists(os.path.join(root, "soak")) or os.path.exists(
      os.path.join(root, "reference")):
    raise ValueError(f"{root} holds an earlier soak (reference/ or soak/): "
                     "give an empty or new --workdir")
  os.makedirs(os.path.join(root, "logs"), exist_ok=True)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  manifest = make_data(os.path.join(root, "data"), seed)
  env = trainer_env(os.path.join(root, "jax_cache"))
  storage = Storage(os.path.join(root, "soak"))
  log = lambda name: os.path.join(root, "logs", name + ".log")
  attempts: List[Attempt] = []
  say(f"Soak {minutes:.3g} min in {root}: {steps} steps, checkpoint every "
      f"{checkpoint_every}, seed {seed}; storage: {storage.how}")
  ref_dir = os.path.join(root, "reference")
  ref = Attempt("reference")
  reference = None
  startup_s, step_s = 40.0, 0.5  # guesses until measured
  try:
    reference = Trainer(trainer_command(ref_dir, manifest, steps,
                                        checkpoint_every),
                        env, log("reference"), repo)
    command = trainer_command(storage.path, manifest, steps, checkpoint_every)
    order = [f for f in faults if storage.can(f)]
    n = 0
    failures_in_a_row = 0
    while True:
      saved = _newest_step(storage.path)
      if ref.rc is None:  # the reference's rows so far, not the guess
        step_s = _median_step_s(ref_dir) or step_s
      left = budget - (time.monotonic() - began)
      finish_s = 1.5 * (startup_s + (steps - saved) * step_s) + 10
      if n >= min_faults and left < finish_s + startup_s + 5:
        break  # min_faults at least, then while time allows
      if saved >= steps - 2 * checkpoint_every:
        break  # too close to the end to hit it again
      fault = order[n] if n < len(order) else rng.choice(order)
      if fault in ("readonly", "readonly_start", "diskfull") and saved == 0:
        fault = "kill"  # the first start writes the workdir: let it
      n += 1
      storage.bind_checkpoints()
      a = _attempt(storage, fault, command, env, log(f"attempt_{n:03d}"), rng,
                   2 * checkpoint_every * step_s, repo, say)
      attempts.append(a)
      if a.rc == 0 and a.end_step == steps:
        break  # it finished all steps during the fault
      progressed = a.end_step > a.start_step or a.fault == "readonly_start"
      failures_in_a_row = 0 if progressed else failures_in_a_row + 1
      if failures_in_a_row >= 6:
        raise SoakError(f"6 trainers in a row saved nothing; the last: "
                        f"{a.last_line} (logs: {root}/logs)")
      if not reference.alive() and ref.rc is None:
        ref = _reference_done(reference, ref_dir, log("reference"), say)
        startup_s, step_s = ref.note_startup_s, ref.note_step_s
    if not attempts or attempts[-1].end_step != steps:
      storage.bind_checkpoints()
      attempts.append(_attempt(storage, "final", command, env, log("final"),
                               rng, 0.0, repo, say))
    if ref.rc is None:
      reference.wait(24 * 3600)
      ref = _reference_done(reference, ref_dir, log("reference"), say)
    if ref.rc != 0 or ref.end_step != steps:
      raise SoakError(f"The reference run failed (exit {ref.rc}): "
                      f"{ref.last_line} (log: {log('reference')})")
    final = attempts[-1]
    params = (compare_params(storage.path, ref_dir)
              if final.rc == 0 and final.end_step == steps
              else {"equal": False, "differ": ["(no final step)"]})
    metrics = check_metrics(storage.path, ref_dir, steps)
    _keep_files(storage.path, os.path.join(root, "soak_files"))
  finally:
    if reference is not None and reference.alive():
      reference.signal(signal.SIGKILL)
      reference.finish()
    storage.close()
  report = {
      "minutes": round((time.monotonic() - began) / 60, 2),
      "minutes_asked": minutes, "seed": seed, "steps": steps,
      "checkpoint_every": checkpoint_every, "storage": storage.how,
      "bad_records": {k: v for k, v in BAD_RECORDS.items() if v},
      "reference": dataclasses.asdict(ref),
      "attempts": [dataclasses.asdict(a) for a in attempts],
      "params": params, "metrics": metrics,
      "faults_not_possible": [f for f in faults if not storage.can(f)],
  }
  report["ok"] = bool(params["equal"] and not metrics["missing"]
                      and not metrics["logged_twice"]
                      and not metrics["broken_lines"]
                      and not metrics["loss_differs"]
                      and metrics["skips_equal"])
  with open(os.path.join(root, "soak_report.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report


# The least time a round is given (a trainer's start alone can take a minute
# on a loaded 2-core machine).
MIN_ROUND_MINUTES = 2.0


def run_rounds(workdir: str, minutes: float, *, seed: int = 0,
               say: Callable[[str], None] = print, **soak_args
               ) -> List[Dict[str, Any]]:
  """Soaks (run_soak) in WORKDIR/round_K, seeds seed, seed+1, ..., each
  given the time left (at least MIN_ROUND_MINUTES), until `minutes` are
  spent or a round fails; their reports. Together they run at least
  `minutes` (a 30-minute soak once stopped at 29.2: its last round finished
  its steps 0.8 min early). One soak's length is its step count's: too few
  steps end it early, too many stop the faulting (the last trainer's
  untouched finish no longer fits the time left), so a long soak is a series
  of checked rounds.
  """
  began = time.monotonic()
  reports = []
  while True:
    left = minutes - (time.monotonic() - began) / 60.0
    if reports and (left <= 0 or not reports[-1]["ok"]):
      return reports
    round_minutes = max(left, MIN_ROUND_MINUTES)
    say(f"Round {len(reports)}: {round_minutes:.1f} min left")
    reports.append(run_soak(os.path.join(workdir, f"round_{len(reports)}"),
                            round_minutes, seed=seed + len(reports), say=say,
                            **soak_args))


def _keep_files(workdir: str, dst: str) -> None:
  """The soak workdir without its checkpoints (a tmpfs goes at the end)."""
  shutil.copytree(workdir, dst, ignore=shutil.ignore_patterns(
      checkpoint.TRAIN_CHECKPOINT_SUBDIR, ".soak_filler", "*.lock"))


def _median_step_s(ref_dir: str) -> Optional[float]:
  """The reference's median step time so far (its first step, which
  compiles, left out); None before it has 5 steps. With the 0.5 s guess a
  long soak stopped faulting after its first fault (its budget check took
  4,400 steps for 37 minutes when they took about 13)."""
  if not os.path.exists(os.path.join(ref_dir, metrics_lib.METRICS_FILE)):
    return None
  times = [r["step_time_s"] for r in metrics_rows(ref_dir)[1:]
           if "step_time_s" in r]
  return float(np.median(times)) if len(times) >= 5 else None


def _reference_done(reference: Trainer, ref_dir: str, log_path: str,
                    say: Callable[[str], None]) -> Attempt:
  """The finished reference as an Attempt; its start-up time (to its first
  metrics row) and step time go to note_startup_s / note_step_s."""
  rc = reference.finish()
  ref = Attempt("reference", rc=rc,
                seconds=time.monotonic() - reference.started,
                end_step=_newest_step(ref_dir), last_line=_last_line(log_path))
  rows = [r for r in metrics_rows(ref_dir) if "step_time_s" in r]
  step_s = _median_step_s(ref_dir) or 0.5
  ref.note_startup_s = max(ref.seconds - step_s * max(len(rows) - 1, 0), 1.0)
  ref.note_step_s = step_s
  say(f"  reference       rc={ref.rc} {ref.seconds:5.1f} s, step "
      f"{ref.end_step}: {ref.last_line[:150]}")
  return ref


def format_table(report: Dict[str, Any]) -> str:
  """The soak's figures as a markdown table."""
  attempts = report["attempts"]
  count = lambda fault: sum(a["fault"] == fault for a in attempts)
  rcs = lambda fault: ",".join(sorted({str(a["rc"]) for a in attempts
                                       if a["fault"] == fault})) or "-"
  mid = sum(a["mid_save"] for a in attempts
            if a["fault"] in ("kill", "kill_midsave"))
  mid_term = sum(a["mid_save"] for a in attempts
                 if a["fault"] in ("term", "term_midsave"))
  m, p = report["metrics"], report["params"]
  stalled = sum("SIGKILL" in a["note"] for a in attempts)
  spells = [a for a in attempts
            if a["fault"] in ("readonly", "readonly_start", "diskfull")]
  spell_lines = (f"{sum(bool(a['error_line']) for a in spells)} of "
                 f"{len(spells)} / {max([a['output_lines'] for a in spells] or [0])}")
  rows = [
      ("wall time", f"{report['minutes']:.1f} min (asked {report['minutes_asked']:.1f})"),
      ("steps x batch 8, checkpoint every", f"{report['steps']}, {report['checkpoint_every']}"),
      ("trainer starts (soak) / stale locks taken over", f"{len(attempts)} / {sum(a['took_over_lock'] for a in attempts)}"),
      ("SIGKILL (random moment / at a save)", f"{count('kill')} / {count('kill_midsave')} (exit {rcs('kill')} / {rcs('kill_midsave')})"),
      ("mid-save SIGKILLs (a tmp step folder there)", mid),
      ("SIGTERM (random moment / at a save)", f"{count('term')} / {count('term_midsave')} (exit {rcs('term')} / {rcs('term_midsave')}; {mid_term} mid-save)"),
      ("read-only spells (mid-run / at start)", f"{count('readonly')} / {count('readonly_start')} (exit {rcs('readonly')} / {rcs('readonly_start')})"),
      ("disk-full spells", f"{count('diskfull')} (exit {rcs('diskfull')})" if "diskfull" not in report["faults_not_possible"] else "not possible here (needs root: tmpfs)"),
      ("spells the trainer outlived (SIGKILLed after 40 s)", stalled),
      ("spell exits: with a one-line error / output lines (most)", spell_lines),
      ("bad records in the manifest (kinds)", f"{len(report['bad_records'])} ({', '.join(sorted(set(report['bad_records'].values())))})"),
      ("skipped examples, soak = reference", f"{m['skipped_total']} ({'yes' if m['skips_equal'] else 'NO'})"),
      ("final params equal the reference bit for bit", f"{'yes' if p['equal'] else 'NO ' + str(p.get('differ'))} ({p.get('leaves', 0)} arrays, {p.get('values', 0)} values)"),
      ("metrics.jsonl: steps logged / missing / broken lines", f"{m['steps_logged']} of {m['steps']} / {len(m['missing'])} / {m['broken_lines']}"),
      ("metrics.jsonl: steps logged twice (a kill's rows not cut on resume)", f"{m['logged_twice']}; losses equal the reference: {'yes' if not m['loss_differs'] else 'NO ' + str(m['loss_differs'])}"),
      ("storage", report["storage"]),
  ]
  lines = ["| soak | |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in rows]
  return "\n".join(lines) + "\n"


def define_flags():
  flags.DEFINE_float("minutes", 10.0, "How long the soak runs: rounds (each "
                     "a soak of --steps, faulted while its time allows) until "
                     "this is spent.")
  flags.DEFINE_string("workdir", None, "An empty or new folder.")
  flags.DEFINE_integer("seed", 0, "Fault order and moments, data order.")
  flags.DEFINE_integer("steps", None, "Train steps (default: "
                       f"{STEPS_PER_MINUTE} a minute, at least 16).")
  flags.DEFINE_integer("checkpoint_every", None, "Default: steps // 40, at "
                       "least 2.")
  flags.DEFINE_list("faults", list(FAULTS), f"Any of {', '.join(FAULTS)}; "
                    "in this order first, then at random.")
  flags.DEFINE_integer("min_faults", 1, "Faulted trainers before the time "
                       "limit may end the soak (e.g. len(--faults): each "
                       "once, whatever the time).")
  flags.mark_flag_as_required("workdir")


def main(argv):
  cli.reject_positional_arguments(argv)
  began = time.monotonic()
  try:
    reports = run_rounds(flags.FLAGS.workdir, flags.FLAGS.minutes,
                         steps=flags.FLAGS.steps,
                         checkpoint_every=flags.FLAGS.checkpoint_every,
                         seed=flags.FLAGS.seed, faults=flags.FLAGS.faults,
                         min_faults=flags.FLAGS.min_faults)
  except SoakError as e:
    print(f"soak: {e}", file=sys.stderr)
    raise SystemExit(1) from None
  root = os.path.abspath(flags.FLAGS.workdir)
  for k, report in enumerate(reports):
    print(f"Round {k} (seed {report['seed']}):")
    print(format_table(report), end="")
  starts = sum(len(r["attempts"]) for r in reports)
  ok = all(r["ok"] for r in reports)
  print(f"{len(reports)} round(s), {(time.monotonic() - began) / 60:.1f} min, "
        f"{starts} soak trainers; every round bit-equal to its reference "
        f"with each step logged once: {'yes' if ok else 'NO'}. Reports: "
        f"{root}/round_K/soak_report.json")
  if not ok:
    raise SystemExit(1)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
