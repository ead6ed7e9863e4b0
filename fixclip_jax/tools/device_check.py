"""The accelerator check: everything we want to learn from a short lease of
one GPU, in one command that never runs past its budget.

  python -m fixclip_jax.tools.device_check --out=DIR [--budget_s=480] \
      [--parts=env,gpu_tests,bench,ablate] [--cpu-smoke]

DIR (else $DEVICE_CHECK_OUT, else $OUT, the device tool's output folder)
receives device_check.log (every part's output, in order), summary.json and
one PART.json per part: {"status": ok | failed | timeout | skipped, "wall_s",
"timeout_s", "error" (one line), "results"}. Each part runs in its own
process under its own timeout, cut to what the budget leaves, so a hang or a
crash costs that part only; what a part recorded before it stopped is kept.

Parts (tools/device_parts.py holds all but env):
  env        devices, versions, the packages the machine lacks, a bf16 matmul rate
  gpu_tests  towers vs open_clip on the device, bf16 vs float32 features, one
             FIX-CLIP train step finite and equal to the CPU step
  bench      tools/bench at batch 256: clip_b16 vs open_clip, fixclip_b16 with
             its plain-CLIP twin and open_clip, longclip_b16; attention xla
             vs cudnn
  ablate     the ablation's discriminative budget at 4x its steps, if the
             budget exists and time is left

--cpu-smoke runs the same parts and code on the CPU with tiny models, batch
8 and 2 steps, so the check cannot rot between leases
(tests/device_check_test.py runs env, gpu_tests and bench so; the ablate
part's smoke trains two 1-step models and is left to `--parts=ablate`). On the accelerator machine the packages it lacks come from
launch/fetch_device_wheels.sh; BENCHMARKS.md "Accelerator check" has the
one-call command.
"""
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import flags
import jax
import jax.numpy as jnp

from fixclip_jax import cli

LOG_FILE = "device_check.log"
SUMMARY_FILE = "summary.json"
OUT_ENV = ("DEVICE_CHECK_OUT", "OUT")   # the output folder, when --out is not given
DEFAULT_BUDGET_S = 480                  # 8 minutes: the bound on one GPU
MIN_PART_S = 20                         # less budget left: the part is skipped
# The smoke checks the code, not the speed: a CPU loaded by other jobs took
# 1 to 6 minutes to compile one tiny train step, so its parts get this many
# times their GPU timeouts (and the budget with them, unless --budget_s says
# otherwise): in practice only the budget bounds a smoke.
SMOKE_TIMEOUT_FACTOR = 10
PARTS_MODULE = "fixclip_jax.tools.device_parts"

# Modules the accelerator image lacks (launch/fetch_device_wheels.sh ships them).
WHEEL_MODULES = ("grain", "ml_collections", "array_record", "portpicker",
                 "open_clip", "ftfy", "wcwidth", "tensorboardX")
# Distributions whose versions the env part records.
VERSIONED = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax",
             "optax", "orbax-checkpoint", "numpy", "torch", "open-clip-torch",
             "transformers", "grain", "ml-collections")


@dataclasses.dataclass(frozen=True)
class Part:
  name: str
  module: str                   # runs it as `python -m module --part=name`
  timeout_s: Optional[float]    # None: what the budget leaves
  what: str


PARTS = (
    Part("env", "fixclip_jax.tools.device_check", 60, "devices, versions, missing packages, bf16 matmul rate"),
    Part("gpu_tests", PARTS_MODULE, 150, "towers vs open_clip, bf16 vs float32 "
         "features, one FIX-CLIP step vs the CPU step"),
    Part("bench", PARTS_MODULE, 300, "tools/bench: clip_b16, fixclip_b16, "
         "longclip_b16 at batch 256 vs open_clip; attention xla vs cudnn"),
    Part("ablate", PARTS_MODULE, None, "ablation, discriminative budget x4 steps"),
)
PART_NAMES = tuple(p.name for p in PARTS)


# ----------------------------------------------------------------------------
# What a part's process records (also used by device_parts).

class Results:
  """A part's results, rewritten whole (atomically) at every `put`, so the
  parent reads what was recorded even if the part is killed."""

  def __init__(self, path: str):
    self.path = path
    self.data: Dict[str, Any] = {}

  def put(self, key: str, value: Any) -> None:
    self.data[key] = value
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, self.path)


def exit_with_parent(poll_s: float = 1.0) -> None:
  """Ends this process (a part) soon after the check that started it is
  gone: a part runs in a session of its own (so that its timeout can kill
  everything it started), so it would outlive a check killed from outside."""
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(poll_s)
    os._exit(3)  # pylint: disable=protected-access  # no cleanup: orphaned

  threading.Thread(target=watch, daemon=True).start()


def error_line(e: BaseException) -> str:
  """`Type: message` on one line, at most 400 characters."""
  return f"{type(e).__name__}: {cli.one_line(e)}"[:400]


def log(message: str) -> None:
  print(f"[device_check] {message}", flush=True)


# ----------------------------------------------------------------------------
# Part env (light: jax and the standard library only, so it reports even
# when the wheels are missing; the parent imports jax but never starts it).

def _version(dist: str) -> Optional[str]:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def matmul_tflops(n: int, repeats: int) -> float:
  """bf16 [n, n] @ [n, n] rate on the default device (random data), TFLOP/s."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  start = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  jax.block_until_ready(out)
  return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def run_env(results: Results, smoke: bool) -> bool:
  """Devices, versions, missing wheels; False if a wheel module is missing."""
  missing = [m for m in WHEEL_MODULES if importlib.util.find_spec(m) is None]
  results.put("missing_modules", missing)
  results.put("python", platform.python_version())
  results.put("machine", platform.platform())
  results.put("versions", {d: _version(d) for d in VERSIONED if _version(d)})
  results.put("env", {k: os.environ.get(k, "") for k in (
      "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS", "PYTHONPATH")})
  devices = jax.devices()
  results.put("backend", jax.default_backend())
  results.put("devices", [{"kind": d.device_kind, "platform": d.platform,
                           "id": d.id} for d in devices])
  try:
    stats = devices[0].memory_stats() or {}
    results.put("memory_bytes_limit", stats.get("bytes_limit"))
  except Exception:  # pylint: disable=broad-except  # CPU has none
    pass
  try:
    nvsmi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,"
                            "memory.total,clocks.max.sm", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    results.put("nvidia_smi", nvsmi.stdout.strip())
  except (OSError, subprocess.TimeoutExpired):
    results.put("nvidia_smi", None)
  n, repeats = (256, 3) if smoke else (8192, 20)
  results.put("bf16_matmul", {"n": n, "tflops": matmul_tflops(n, repeats)})
  log(f"env: {jax.default_backend()} {[d.device_kind for d in devices][:2]} "
      f"x{len(devices)}; jax {jax.__version__}; missing modules: "
      f"{', '.join(missing) or 'none'}")
  if missing:
    results.put("error", f"missing modules {', '.join(missing)}: install the "
                "wheels of launch/fetch_device_wheels.sh")
  return not missing or smoke


# ----------------------------------------------------------------------------
# The parent: parts in turn, each in its own process under its own timeout.

def output_dir(flag_value: Optional[str]) -> str:
  """--out, else $DEVICE_CHECK_OUT, else $OUT; cli.UserError if none."""
  for value in (flag_value,) + tuple(os.environ.get(k) for k in OUT_ENV):
    if value:
      return value
  raise cli.UserError("no output folder: pass --out=DIR (or set "
                      f"{' or '.join(OUT_ENV)})")


def _pump(stream, sinks) -> None:
  for line in iter(stream.readline, ""):
    for sink in sinks:
      sink.write(line)
      sink.flush()


def _last_error(output: List[str]) -> str:
  """The line of a part's output that best says why it failed."""
  lines = [l.strip() for l in output if l.strip()]
  for line in reversed(lines):
    if "Error" in line or "error:" in line or "Exception" in line:
      return line[:400]
  return lines[-1][:400] if lines else ""


def _failed_check(results: Dict[str, Any]) -> str:
  """'check: error' of the first check a part recorded as failed."""
  for name, value in results.items():
    if isinstance(value, dict) and value.get("ok") is False:
      return f"{name}: {value.get('error') or 'out of tolerance (see its numbers)'}"
  return ""


def run_part(part: Part, timeout_s: float, out_dir: str, scratch: str,
             smoke: bool, log_file, cache_dir: str) -> Dict[str, Any]:
  """Runs one part in a child process; its PART.json record."""
  result_path = os.path.join(scratch, f"{part.name}.json")
  cmd = [sys.executable, "-m", part.module, f"--part={part.name}",
         f"--result={result_path}", f"--scratch={scratch}"]
  if smoke:
    cmd.append("--cpu-smoke")
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             # open_clip shares the GPU with JAX in one process (tools/bench).
             XLA_PYTHON_CLIENT_PREALLOCATE="false",
             # Parts compile some programs alike (a plain-CLIP config and its
             # twin, the ablation's seeds): compiled once, read from disk after.
             JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  if smoke:  # one CPU device: the smoke checks the code, not a mesh
    env["JAX_PLATFORMS"] = "cpu"
    # PyTorch's OpenMP threads spin-wait against a loaded CPU (BENCHMARKS.md).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "host_platform_device_count" not in f)
  header = f"=== {part.name}: {part.what} (timeout {timeout_s:.0f} s)\n"
  log_file.write(header)
  log_file.flush()
  sys.stdout.write(header)
  output: List[str] = []

  class Collect:  # keeps the part's lines for its error line
    def write(self, line):
      output.append(line)

    def flush(self):
      pass

  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, start_new_session=True)
  pump = threading.Thread(target=_pump, args=(proc.stdout, (log_file, sys.stdout,
                                                            Collect())))
  pump.start()
  status = None
  try:
    returncode = proc.wait(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    # The part's process group: the part and anything it started.
    os.killpg(proc.pid, signal.SIGKILL)
    returncode = proc.wait()
    status = "timeout"
  pump.join(timeout=10)
  wall = time.perf_counter() - start
  results = {}
  if os.path.isfile(result_path):
    with open(result_path) as f:
      results = json.load(f)
  if status is None:
    if returncode == 0:
      status = "skipped" if results.get("skipped") else "ok"
    else:
      status = "failed"
  error = ""
  if status == "timeout":
    error = f"stopped after its timeout of {timeout_s:.0f} s"
  elif status == "failed":
    error = results.get("error") or _failed_check(results) or _last_error(output)
  elif status == "skipped":
    error = results["skipped"]
  record = {"part": part.name, "what": part.what, "status": status,
            "wall_s": round(wall, 1), "timeout_s": round(timeout_s, 1),
            "returncode": returncode, "error": error, "cpu_smoke": smoke,
            "results": results}
  line = f"--- {part.name}: {status} in {wall:.1f} s" + (f" ({error})" if error else "")
  for sink in (log_file, sys.stdout):
    sink.write(line + "\n")
    sink.flush()
  _write_json(os.path.join(out_dir, f"{part.name}.json"), record)
  return record


def _write_json(path: str, data: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, sort_keys=True, default=str)
  os.replace(tmp, path)


def skipped_record(part: Part, reason: str, smoke: bool) -> Dict[str, Any]:
  return {"part": part.name, "what": part.what, "status": "skipped",
          "wall_s": 0.0, "timeout_s": 0.0, "returncode": None, "error": reason,
          "cpu_smoke": smoke, "results": {}}


def run_check(out_dir: str, parts: Sequence[str] = PART_NAMES,
              budget_s: float = DEFAULT_BUDGET_S, smoke: bool = False,
              cache_dir: Optional[str] = None) -> Dict[str, Any]:
  """Runs the named parts in order within budget_s; writes and returns the
  summary ({"parts": {name: status, wall_s, error}, ...}).

  cache_dir: jax's persistent compilation cache for the parts (default a
  fresh folder: shared by the parts of this check only).
  """
  unknown = sorted(set(parts) - set(PART_NAMES))
  if unknown:
    raise cli.UserError(f"--parts: unknown part(s) {', '.join(unknown)}; "
                        f"known: {', '.join(PART_NAMES)}")
  os.makedirs(out_dir, exist_ok=True)
  start = time.perf_counter()
  summary = {"date": datetime.datetime.now(datetime.timezone.utc).strftime(
                 "%Y-%m-%d %H:%M UTC"),
             "host": platform.node(), "cpu_smoke": smoke, "budget_s": budget_s,
             "parts": {}}
  with tempfile.TemporaryDirectory(prefix="device_check_") as scratch, \
      open(os.path.join(out_dir, LOG_FILE), "a") as log_file:
    log_file.write(f"device_check {summary['date']} on {summary['host']} "
                   f"(budget {budget_s:.0f} s{', cpu smoke' if smoke else ''})\n")
    factor = SMOKE_TIMEOUT_FACTOR if smoke else 1
    for part in (p for p in PARTS if p.name in parts):
      left = budget_s - (time.perf_counter() - start)
      own = None if part.timeout_s is None else part.timeout_s * factor
      timeout = left if own is None else min(own, left)
      if left < min(MIN_PART_S, own or MIN_PART_S):
        record = skipped_record(part, f"{left:.0f} s of the {budget_s:.0f} s "
                                "budget left", smoke)
        _write_json(os.path.join(out_dir, f"{part.name}.json"), record)
        log_file.write(f"--- {part.name}: skipped ({record['error']})\n")
      else:
        record = run_part(part, timeout, out_dir, scratch, smoke, log_file,
                          cache_dir or os.path.join(scratch, "jax_cache"))
      summary["parts"][part.name] = {k: record[k] for k in ("status", "wall_s",
                                                            "error")}
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    table = format_summary(summary)
    log_file.write(table + "\n")
  print(table)
  _write_json(os.path.join(out_dir, SUMMARY_FILE), summary)
  return summary


def format_summary(summary: Dict[str, Any]) -> str:
  lines = ["| part | status | wall s | error |", "|---|---|---|---|"]
  for name, p in summary["parts"].items():
    lines.append(f"| {name} | {p['status']} | {p['wall_s']} | {p['error'] or '-'} |")
  lines.append(f"total {summary['wall_s']} s of a {summary['budget_s']:.0f} s budget")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# CLI.

FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined only when run as a program: no clash on import)."""
  flags.DEFINE_string("out", None, "Output folder (default $DEVICE_CHECK_OUT, "
                      "else $OUT).")
  flags.DEFINE_list("parts", list(PART_NAMES), "Parts to run, in this order: "
                    + ",".join(PART_NAMES))
  flags.DEFINE_float("budget_s", None, "Wall-clock budget of the whole check "
                     f"(default {DEFAULT_BUDGET_S} s; x{SMOKE_TIMEOUT_FACTOR} "
                     "with --cpu-smoke); each part's timeout is cut to what is left.")
  flags.DEFINE_bool("cpu-smoke", False, "Tiny models, batch 8, 2 steps, on "
                    "the CPU: the same code, checked rather than timed.")
  flags.DEFINE_string("cache_dir", None, "jax's persistent compilation cache "
                      "for the parts (default: a fresh one per check).")
  # A part's own process (the parent passes these).
  flags.DEFINE_string("part", None, "Run only this part, in this process.")
  flags.DEFINE_string("result", None, "With --part: where its results go.")
  flags.DEFINE_string("scratch", None, "With --part: a folder for its files.")


def main(argv):
  cli.reject_positional_arguments(argv)
  smoke = FLAGS["cpu-smoke"].value
  if FLAGS.part:  # the env part's child
    if FLAGS.part != "env" or not FLAGS.result:
      raise cli.UserError(f"--part={FLAGS.part}: this module runs only env "
                          "(with --result)")
    exit_with_parent()
    results = Results(FLAGS.result)
    sys.exit(0 if run_env(results, smoke) else 1)
  budget_s = FLAGS.budget_s
  if budget_s is None:
    budget_s = DEFAULT_BUDGET_S * (SMOKE_TIMEOUT_FACTOR if smoke else 1)
  if budget_s <= 0:
    raise cli.UserError(f"--budget_s={budget_s:g} must be > 0")
  summary = run_check(output_dir(FLAGS.out), FLAGS.parts, budget_s, smoke,
                      FLAGS.cache_dir)
  failed = [n for n, p in summary["parts"].items() if p["status"] in ("failed", "timeout")]
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
