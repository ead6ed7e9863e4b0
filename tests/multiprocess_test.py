"""Two local processes x 4 CPU devices train like one process x 8 (issue 6)."""
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


class MultiProcessTest(absltest.TestCase):

  def test_two_processes_match_one(self):
    tmp = tempfile.mkdtemp()
    env = dict(os.environ, PYTHONPATH=_ROOT)
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    outs = [os.path.join(tmp, f"p{i}.json") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, _WORKER, str(i), "2", str(port), "4",
                               outs[i]], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    single_out = os.path.join(tmp, "single.json")
    single = subprocess.run([sys.executable, _WORKER, "0", "1", "0", "8", single_out],
                            env=env, capture_output=True, text=True, timeout=600)
    logs = [p.communicate(timeout=600)[0] for p in procs]
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
