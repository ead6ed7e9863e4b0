"""The soak tool (fixclip_jax/tools/soak.py), CI-sized: SLOW, marked.

A 2-minute soak: a reference run alongside, then trainers hit by faults (a
SIGKILL while a checkpoint is being written first; then, while the 2 minutes
allow, a SIGTERM, a read-only spell mid-run, a SIGKILL at a random moment),
then one to the end; bad records in the manifest. Its wall time is
the machine's: on the shared 2-core VM it took 2.6 min at load 12 (one fault
fit) and 12.6 min at load 22 (a trainer's start: 4-7 min); on an idle
machine more faults fit in the 2 minutes. FIXCLIP_SKIP_SLOW=1 skips it. The
final parameters must equal the uninterrupted reference's bit for bit;
every step must be in metrics.jsonl, replayed steps' losses and the skip
totals as the reference's. Disk-full and read-only-at-start spells are
left to the longer soaks (BENCHMARKS.md, "Soak"; one disk-full spell left a
broken line in metrics.jsonl, reported there).
"""
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest

from fixclip_jax.tools import soak

# The first always; the others while the 2 minutes allow.
CI_FAULTS = ("kill_midsave", "term", "readonly", "kill")


class SoakTest(absltest.TestCase):

  @absltest.skipIf(os.environ.get("FIXCLIP_SKIP_SLOW") == "1",
                   "FIXCLIP_SKIP_SLOW=1")
  def test_a_two_minute_soak_loses_nothing(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    report = soak.run_soak(os.path.join(root, "soak"), minutes=2.0, steps=12,
                           checkpoint_every=2, seed=0, faults=CI_FAULTS)
    table = soak.format_table(report)
    print(table)
    attempts = report["attempts"]
    self.assertEqual(attempts[0]["fault"], "kill_midsave", table)
    # The kill at a save hit one (orbax's tmp step folder was there).
    self.assertTrue(any(a["mid_save"] for a in attempts
                        if a["fault"] == "kill_midsave"), table)
    # SIGTERM: a checkpoint saved, exit 0.
    for a in attempts:
      if a["fault"] in ("term", "term_midsave", "final"):
        self.assertEqual(a["rc"], 0, a)
      if a["fault"] in ("kill", "kill_midsave"):
        self.assertEqual(a["rc"], -9, a)
      if a["fault"] in ("readonly", "readonly_start", "diskfull"):
        self.assertTrue(a["error_line"], a)  # one line, exit != 0
        self.assertNotEqual(a["rc"], 0, a)
    self.assertEqual(attempts[-1]["end_step"], 12, table)
    self.assertTrue(report["params"]["equal"], table)
    metrics = report["metrics"]
    self.assertEmpty(metrics["missing"], table)
    self.assertEqual(metrics["logged_twice"], 0, table)
    self.assertEqual(metrics["broken_lines"], 0, table)
    self.assertEmpty(metrics["loss_differs"], table)
    self.assertTrue(metrics["skips_equal"], table)
    self.assertGreater(metrics["skipped_total"], 0, table)
    self.assertTrue(report["ok"], table)
    self.assertFalse(os.path.ismount(os.path.join(root, "soak", "soak")))


class RoundsTest(absltest.TestCase):
  """run_rounds: soaks one after another until the minutes are spent."""

  def _rounds(self, minutes, ok=lambda seed: True):
    clock = [0.0]
    calls = []

    def one_round(workdir, minutes_left, *, seed, say, **kwargs):
      calls.append((os.path.basename(workdir), round(minutes_left, 3), seed,
                    kwargs))
      clock[0] += 60.0                  # each round takes a minute
      return {"ok": ok(seed), "seed": seed}

    with mock.patch.object(soak, "run_soak", one_round), \
         mock.patch.object(soak.time, "monotonic", lambda: clock[0]):
      reports = soak.run_rounds("/w", minutes, seed=5, steps=12,
                                say=lambda line: None)
    return reports, calls

  def test_rounds_go_on_while_the_time_allows(self):
    reports, calls = self._rounds(4.5)
    self.assertEqual([c[:3] for c in calls], [("round_0", 4.5, 5),
                                              ("round_1", 3.5, 6),
                                              ("round_2", 2.5, 7),
                                              ("round_3", 2.0, 8),
                                              ("round_4", 2.0, 9)])
    self.assertEqual(calls[0][3], {"steps": 12})
    self.assertLen(reports, 5)

  def test_the_rounds_run_at_least_the_minutes_asked(self):
    # Rounds of one minute: 2.5 minutes asked leave 0.5 after two, and a
    # third round (given the minimum) makes the soak at least 2.5 minutes.
    reports, calls = self._rounds(2.5)
    self.assertEqual([c[:3] for c in calls],
                     [("round_0", 2.5, 5), ("round_1", 2.0, 6),
                      ("round_2", soak.MIN_ROUND_MINUTES, 7)])
    self.assertLen(reports, 3)

  def test_a_failed_round_ends_the_soak(self):
    reports, calls = self._rounds(10.0, ok=lambda seed: seed != 5)
    self.assertLen(calls, 1)
    self.assertFalse(reports[0]["ok"])


if __name__ == "__main__":
  absltest.main()
