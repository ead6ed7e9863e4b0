"""tools/readme_table.py: the README's demo table is the demo's own printed
table, rebuilt from its eval_results.md (issue 26)."""
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest

from fixclip_jax.evaluation import report
from fixclip_jax.tools import readme_table

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Results as an evaluation records them: two models (so a model column), an
# absent step, ints and floats, a dataset/protocol pair the console labels
# "dataset (protocol)".
_RESULTS = [
    {"model": "CLIP-77 (start)", "step": 300, "dataset": "synthetic",
     "protocol": "synthetic-long", "i2t_R@1": 5.859375, "i2t_R@10": 53.515625,
     "t2i_R@1": 7.8125, "t2i_R@10": 54.296875, "num_images": 256},
    {"model": "tiny", "step": 150, "dataset": "synthetic",
     "protocol": "synthetic-short", "i2t_R@1": 7.8125, "i2t_R@10": 56.640625,
     "t2i_R@1": 8.203125, "t2i_R@10": 57.8125, "num_images": 256},
    {"model": "tiny", "step": None, "dataset": "urban1k",
     "protocol": "long", "i2t_R@1": 12.005, "t2i_R@1": 0.125},
]


class ReadmeTableTest(absltest.TestCase):

  def test_readme_table_is_the_one_its_results_give(self):
    with open(os.path.join(_ROOT, readme_table.RESULTS_COPY)) as f:
      results_md = f.read()
    with open(os.path.join(_ROOT, readme_table.README)) as f:
      readme = f.read()
    self.assertEqual(readme_table.readme_table(readme),
                     readme_table.demo_table(results_md),
                     "README.md's demo table is stale or edited by hand: run "
                     "python -m fixclip_jax.tools.readme_table")

  def test_table_equals_what_the_run_prints(self):
    # eval_results.md as report writes it -> the console table of the same
    # results (what train.py prints when the demo ends).
    rebuilt = readme_table.demo_table(report.markdown_table(_RESULTS))
    self.assertEqual(rebuilt, report.console_table(_RESULTS))
    self.assertIn("| CLIP-77 (start) | 300 | synthetic-long | 5.86 | 53.52 | "
                  "7.81 | 54.30 |", rebuilt)
    self.assertIn("| tiny | - | urban1k (long) | 12.01 | - | 0.12 | - |", rebuilt)

  def test_cli_writes_between_the_markers_and_checks(self):
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    workdir = os.path.join(tmp, "demo")
    os.makedirs(workdir)
    with open(os.path.join(workdir, report.MARKDOWN_NAME), "w") as f:
      f.write(report.markdown_table(_RESULTS))
    readme = os.path.join(tmp, "README.md")
    with open(readme, "w") as f:
      f.write(f"# title\n\ntext before\n{readme_table.BEGIN}\n| old |\n"
              f"{readme_table.END}\ntext after\n")
    copy = os.path.join(tmp, "docs_copy.md")
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "fixclip_jax.tools.readme_table",
         f"--readme={readme}", f"--results={copy}", *a],
        cwd=_ROOT, capture_output=True, text=True, timeout=120)
    proc = run("--check", f"--workdir={workdir}")
    self.assertEqual(proc.returncode, 1, proc.stderr)
    self.assertFalse(os.path.exists(copy))  # --check writes nothing
    proc = run(f"--workdir={workdir}")
    self.assertEqual(proc.returncode, 0, proc.stderr)
    with open(readme) as f:
      text = f.read()
    self.assertEqual(text, f"# title\n\ntext before\n{readme_table.BEGIN}\n"
                     f"{report.console_table(_RESULTS)}{readme_table.END}\n"
                     "text after\n")
    with open(copy) as f:
      self.assertEqual(f.read(), report.markdown_table(_RESULTS))
    self.assertEqual(run("--check").returncode, 0)  # from the kept copy
    # Bad input: one line naming the file, nothing written.
    with open(os.path.join(workdir, report.MARKDOWN_NAME), "w") as f:
      f.write("| model | step | dataset | protocol | i2t_R@1 |\n|---|---|---|---|---|\n"
              "| tiny | 1 | synthetic | synthetic-long | lots |\n")
    proc = run(f"--workdir={workdir}")
    self.assertEqual(proc.returncode, 2)
    self.assertLen(proc.stderr.strip().splitlines(), 1)
    self.assertIn("eval_results.md: table row 3: column 'i2t_R@1' holds 'lots'",
                  proc.stderr)
    with open(readme) as f:
      self.assertEqual(f.read(), text)
    with open(readme, "w") as f:
      f.write("no markers\n")
    proc = run()
    self.assertEqual(proc.returncode, 2)
    self.assertIn("README.md: needs exactly one line", proc.stderr)


if __name__ == "__main__":
  absltest.main()
