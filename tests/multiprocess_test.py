"""Two local processes x 4 CPU devices train like one process x 8 (issue 6);
a two-process run takes its workdir's lock once, on process 0 (issue 23)."""
import fcntl
import json
import os
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = os.path.join(_ROOT, "tests", "multiprocess_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two(tmp, *args):
  """Both processes of a 2-process run of the worker, started; their outputs."""
  env = dict(os.environ, PYTHONPATH=_ROOT)
  env.pop("XLA_FLAGS", None)
  port = _free_port()
  outs = [os.path.join(tmp, f"p{i}.json") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, _WORKER, str(i), "2", str(port), "4",
                             outs[i], *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  return procs, outs


def _logs(procs, timeout=600):
  return [p.communicate(timeout=timeout)[0] for p in procs]


class MultiProcessTest(absltest.TestCase):

  def test_two_processes_lock_the_workdir_once_and_share_a_refusal(self):
    tmp = tempfile.mkdtemp()
    workdir = os.path.join(tmp, "run")
    procs, outs = _start_two(tmp, f"--lock={workdir}")
    logs = _logs(procs, timeout=300)
    for p, log in zip(procs, logs):
      self.assertEqual(p.returncode, 0, log[-3000:])
    got = [json.load(open(o)) for o in outs]
    self.assertEqual([g["outcome"] for g in got], ["locked", "locked"])
    with open(os.path.join(workdir, "run.lock")) as f:
      self.assertEqual(json.load(f)["pid"], got[0]["pid"])  # process 0's only

    # A live holder (this test, flock held): process 0 is refused naming it,
    # process 1 learns that from process 0 instead of locking on its own.
    other = os.path.join(tmp, "held")
    os.makedirs(other)
    fd = os.open(os.path.join(other, "run.lock"), os.O_RDWR | os.O_CREAT)
    self.addCleanup(os.close, fd)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": "now"}).encode())
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    procs, outs = _start_two(tmp, f"--lock={other}")
    _logs(procs, timeout=300)
    got = [json.load(open(o))["outcome"] for o in outs]
    self.assertRegex(got[0], rf"refused: .* is in use by another run \(pid "
                     rf"{os.getpid()} ")
    self.assertRegex(got[1], r"refused: .* is in use by another run \(process 0 "
                     r"could not take ")

  def test_two_processes_match_one(self):
    tmp = tempfile.mkdtemp()
    env = dict(os.environ, PYTHONPATH=_ROOT)
    env.pop("XLA_FLAGS", None)
    procs, outs = _start_two(tmp)  # the pair and the single run at once
    single_out = os.path.join(tmp, "single.json")
    single = subprocess.run([sys.executable, _WORKER, "0", "1", "0", "8", single_out],
                            env=env, capture_output=True, text=True, timeout=600)
    logs = _logs(procs)
    for p, log in zip(procs, logs):
      self.assertEqual(p.returncode, 0, log[-3000:])
    self.assertEqual(single.returncode, 0, single.stderr[-3000:])

    ref = json.load(open(single_out))
    self.assertEqual((ref["devices"], ref["processes"]), (8, 1))
    for out in outs:
      got = json.load(open(out))
      self.assertEqual((got["devices"], got["processes"]), (8, 2))
      for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        for key in ("loss", "loss_long", "loss_short", "loss_gta_2"):
          np.testing.assert_allclose(a[key], b[key], rtol=1e-5,
                                     err_msg=f"step {step} {key}")
    print("two processes vs one, losses per step:",
          [round(r["loss"], 5) for r in ref["losses"]])


if __name__ == "__main__":
  absltest.main()
