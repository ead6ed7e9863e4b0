"""ShareGPT4V's captioner json for training, preparation and evaluation (issue 21
item 4): the first 1,000 entries held out as Long-CLIP does, the evaluation's
warning when its images are training images, and the step count that follows
the data (num_train_epochs)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import ml_collections
import numpy as np
from PIL import Image
import torch

from fixclip_jax import cli
from fixclip_jax import config_base
from fixclip_jax import config_check
from fixclip_jax import main
from fixclip_jax.data import pipeline
from fixclip_jax.data import prepare
from fixclip_jax.data import sharegpt4v
from fixclip_jax.data import sources
from fixclip_jax.data import tokenizers
from fixclip_jax.evaluation import datasets
from fixclip_jax.evaluation import run as eval_run

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
_SHAPES = ("circle", "square", "triangle", "star", "ring")


def _caption(i: int) -> str:
  # Two paragraphs, as ShareGPT4V's captions; long enough for prepare's filters.
  return (f"The image shows a {_COLORS[i % 7]} {_SHAPES[i % 5]} drawn near "
          f"the middle of a plain canvas, item number {i}.\nBelow it there "
          f"is a thin {_COLORS[(i + 3) % 7]} line across the frame.")


def _write_sharegpt4v(root: str, num_entries: int, with_images=range(0)):
  """A captioner json of `num_entries` entries in the released layout, and
  8x8 PNGs for the entries in `with_images`; returns the json's path."""
  entries = []
  for i in range(num_entries):
    folder = ("coco/train2017", "sam/images", "llava/llava_pretrain/images")[i % 3]
    entries.append({"id": f"id{i:05d}", "image": f"{folder}/{i:06d}.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nDescribe it."},
                        {"from": "gpt", "value": _caption(i)}]})
  for i in with_images:
    path = os.path.join(root, entries[i]["image"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), i % 256, np.uint8)).save(path)
  path = os.path.join(root, sharegpt4v.JSON_NAME)
  with open(path, "w") as f:
    json.dump(entries, f)
  return path


def _data_config(**overrides) -> ml_collections.ConfigDict:
  config = config_base.base_config()
  for key, value in overrides.items():
    config_base.set_knob(config, key, value)
  return config


class ShareGPT4VSourceTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

  def test_drops_the_first_1000_entries_as_long_clip(self):
    path = _write_sharegpt4v(self.root, 1003, with_images=range(1000, 1003))
    source = sources.ShareGPT4VSource(path)
    # Long-CLIP's train/sharegpt4v.py (share4v_train_dataset), written out:
    # json.load(fp)[1000:], caption = conversations[1]["value"] with "\n" -> " ",
    # image = image_root + entry["image"], image_root = the json's folder.
    with open(path, encoding="utf8") as fp:
      official = json.load(fp)[1000:]
    self.assertLen(source, len(official))
    for i, entry in enumerate(official):
      example = source[i]
      self.assertEqual(example["caption"],
                       entry["conversations"][1]["value"].replace("\n", " "))
      with open(os.path.join(self.root, entry["image"]), "rb") as f:
        self.assertEqual(example["image"], f.read())
      self.assertEqual(example["key"], entry["id"])
      self.assertIsNone(example["short_caption"])
    self.assertIn("entry 1001", source.location(1))

  def test_make_source_and_holdout_knob(self):
    path = _write_sharegpt4v(self.root, 12, with_images=range(12))
    config = _data_config(**{"data.type": "sharegpt4v", "data.path": path,
                             "data.holdout_first": 4})
    config_check.check_config(config, "train", device_count=1, process_count=1)
    source = sources.make_source(config.data)
    self.assertIsInstance(source, sources.ShareGPT4VSource)
    self.assertLen(source, 8)
    self.assertEqual(source[0]["key"], "id00004")
    self.assertEqual(sources.source_length(config.data), 8)
    config.data.holdout_first = 0
    self.assertLen(sources.make_source(config.data), 12)
    config.data.holdout_first = 12
    with self.assertRaisesRegex(ValueError, "none left after holding out the "
                                "first 12"):
      sources.make_source(config.data)
    config.data.holdout_first = -1
    with self.assertRaisesRegex(config_check.ConfigError,
                                "data.holdout_first=-1"):
      config_check.check_config(config, "train", device_count=1,
                                process_count=1)

  def test_trains_through_the_pipeline(self):
    path = _write_sharegpt4v(self.root, 6, with_images=range(6))
    data = _data_config(**{"data.type": "sharegpt4v", "data.path": path,
                           "data.holdout_first": 2, "data.image_size": 24,
                           "data.global_batch": 4, "data.num_epochs": 1,
                           "data.read_threads": 2}).data
    tokenizer = tokenizers.get_tokenizer("clip", context_length=248)
    batch = next(pipeline.make_train_iterator(data, tokenizer,
                                              process_index=0, process_count=1))
    self.assertEqual(sorted(batch["index"].tolist()), [0, 1, 2, 3])
    for row, index in enumerate(batch["index"]):
      entry = 2 + int(index)  # the first two entries are held out
      # Long-CLIP's captions (train/sharegpt4v.py), written out.
      caption = _caption(entry).replace("\n", " ")
      np.testing.assert_array_equal(batch["text_long"][row],
                                    tokenizer([caption])[0])
      np.testing.assert_array_equal(batch["text_short"][row],
                                    tokenizer([caption.split(". ")[0]])[0])
      self.assertEqual(int(batch["image"][row].mean()), entry)  # its PNG

  def test_a_bad_entry_costs_one_example(self):
    path = _write_sharegpt4v(self.root, 4, with_images=range(4))
    with open(path) as f:
      entries = json.load(f)
    del entries[2]["conversations"][1]
    with open(path, "w") as f:
      json.dump(entries, f)
    source = sources.ShareGPT4VSource(path, holdout_first=1)
    self.assertEqual(source[0]["key"], "id00001")
    with self.assertRaisesRegex(sources.BadRecordError,
                                r"entry 2: needs a string at conversations\[1\]"):
      source[1]
    self.assertEqual(source[2]["key"], "id00003")
    self.assertLen(source.image_paths(), 2)

  def test_not_a_list_names_the_file(self):
    path = os.path.join(self.root, sharegpt4v.JSON_NAME)
    with open(path, "w") as f:
      json.dump({"image": "a.png"}, f)
    with self.assertRaisesRegex(ValueError, f"{path}: should hold one JSON list"):
      sources.ShareGPT4VSource(path)

  def test_eval_split_and_training_share_the_format(self):
    path = _write_sharegpt4v(self.root, 10, with_images=range(10))
    ds = datasets.load_sharegpt4v(self.root, num_examples=4)
    train = sources.ShareGPT4VSource(path, holdout_first=4)
    self.assertEqual(ds.protocol, "sharegpt4v-first4")
    self.assertEqual(sharegpt4v.eval_split_size(ds.protocol), 4)
    self.assertEqual(ds.texts[1], _caption(1).replace("\n", " "))
    self.assertEmpty(set(ds.image_paths) & set(train.image_paths()))
    self.assertEqual(len(ds.image_paths) + len(train.image_paths()), 10)


class PrepareTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

  def test_prepare_recognises_the_json_and_records_the_holdout(self):
    path = _write_sharegpt4v(self.root, 7, with_images=range(7))
    dst = os.path.join(self.root, "shards")
    meta = prepare.prepare(path, dst, 2, holdout_first=3, progress=False)
    self.assertEqual((meta["count"], meta["num_input"]), (4, 4))
    self.assertEqual(meta["source_format"], "sharegpt4v")
    self.assertEqual(meta["holdout_first"], 3)
    with open(os.path.join(dst, sources.METADATA_FILE)) as f:
      self.assertEqual(json.load(f)["holdout_first"], 3)
    shards = sources.ArrayRecordSource(dst)
    self.assertEqual(sorted(shards[i]["key"] for i in range(len(shards))),
                     ["id00003", "id00004", "id00005", "id00006"])
    captions = {shards[i]["key"]: shards[i]["caption"] for i in range(4)}
    self.assertEqual(captions["id00003"], _caption(3).replace("\n", " "))

  def test_cli_default_holds_out_1000(self):
    path = _write_sharegpt4v(self.root, 1002, with_images=range(1000, 1002))
    dst = os.path.join(self.root, "shards")
    out = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.data.prepare", f"--src={path}",
         f"--dst={dst}", "--num_shards=1", "--tokenizer="],
        cwd=_REPO, capture_output=True, text=True, timeout=300)
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])
    with open(os.path.join(dst, sources.METADATA_FILE)) as f:
      meta = json.load(f)
    self.assertEqual((meta["count"], meta["holdout_first"],
                      meta["source_format"]), (2, 1000, "sharegpt4v"))


class OverlapWarningTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
    self.json = _write_sharegpt4v(self.root, 10, with_images=range(10))
    self.eval_sets = [datasets.load_sharegpt4v(self.root, num_examples=4)]

  def _warnings(self, **data):
    config = _data_config(**{f"data.{k}": v for k, v in data.items()})
    with self.assertLogs(level="WARNING") as logs:
      lines = eval_run.warn_train_overlap(config.data, self.eval_sets)
      eval_run.logging.warning("end")  # assertLogs needs one record
    self.assertEqual([r.getMessage() for r in logs.records][:-1], lines)
    return lines

  def test_sharegpt4v_json_warns_without_the_holdout_only(self):
    lines = self._warnings(type="sharegpt4v", path=self.json, holdout_first=2)
    self.assertLen(lines, 1)
    self.assertIn("sharegpt4v-4: 2 of its 4 images are also training images",
                  lines[0])
    self.assertIn(os.path.join(self.root, "llava/llava_pretrain/images/"
                               "000002.png"), lines[0])
    self.assertEqual(self._warnings(type="sharegpt4v", path=self.json,
                                    holdout_first=4), [])

  def test_jsonl_manifest_listing_an_eval_image_warns(self):
    manifest = os.path.join(self.root, "train.jsonl")
    with open(manifest, "w") as f:
      for i in (3, 7, 8):
        image = self.eval_sets[0].image_paths[i] if i < 4 else f"x{i}.png"
        f.write(json.dumps({"image": image, "caption": "a"}) + "\n")
    lines = self._warnings(type="jsonl", path=manifest)
    self.assertLen(lines, 1)
    self.assertIn("1 of its 4 images", lines[0])
    self.assertIn(self.eval_sets[0].image_paths[3], lines[0])
    with open(manifest, "w") as f:
      f.write(json.dumps({"image": "x.png", "caption": "a"}) + "\n")
    self.assertEqual(self._warnings(type="jsonl", path=manifest,
                                    image_root=self.root), [])

  def test_shards_prepared_without_the_holdout_warn(self):
    without = os.path.join(self.root, "without")
    prepare.prepare(self.json, without, 1, holdout_first=0, progress=False)
    lines = self._warnings(type="array_record", path=without)
    self.assertLen(lines, 1)
    self.assertIn(f"holding out its first 0 entries, so up to 4 of this "
                  f"split's 4 images", lines[0])
    self.assertIn("--holdout_first=4", lines[0])
    held = os.path.join(self.root, "held")
    prepare.prepare(self.json, held, 1, holdout_first=4, progress=False)
    self.assertEqual(self._warnings(type="array_record",
                                    path=os.path.join(held, "*.array_record")),
                     [])

  def test_warns_once_a_process(self):
    self.assertLen(self._warnings(type="sharegpt4v", path=self.json,
                                  holdout_first=0), 1)
    self.assertEqual(self._warnings(type="sharegpt4v", path=self.json,
                                    holdout_first=0), [])


class EpochStepsTest(absltest.TestCase):

  def test_formula_matches_long_clip_dataloader(self):
    # Long-CLIP (train/train.py): steps = num_epoch * len(train_loader), a
    # DataLoader without drop_last over a DistributedSampler (16 GPUs x 128).
    pairs = 1_246_901 - 1000
    sampler = torch.utils.data.distributed.DistributedSampler(
        range(pairs), num_replicas=16, rank=0, shuffle=True)
    loader = torch.utils.data.DataLoader(range(pairs), batch_size=128,
                                         sampler=sampler)
    self.assertEqual(6 * len(loader), 3654)
    self.assertEqual(config_base.steps_for_epochs(6, pairs, 2048), 3654)
    for pairs, batch, epochs in ((10, 4, 1), (8, 4, 3), (9, 4, 2), (610, 1, 0.1),
                                 (1000, 7, 2.5)):
      loader = torch.utils.data.DataLoader(range(pairs), batch_size=batch)
      self.assertEqual(config_base.steps_for_epochs(epochs, pairs, batch),
                       int(np.ceil(round(epochs * len(loader), 6))),
                       (pairs, batch, epochs))

  def test_main_resolves_steps_from_the_source(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    path = _write_sharegpt4v(root, 1023)
    config = _data_config(**{"data.type": "sharegpt4v", "data.path": path,
                             "data.global_batch": 4, "num_train_epochs": 3.0,
                             "num_train_steps": 1})
    main.resolve_train_steps(config, "eval")
    self.assertEqual(config.num_train_steps, 1)  # eval trains nothing
    main.resolve_train_steps(config, "train")
    self.assertEqual(config.num_train_steps, 3 * 6)  # 23 pairs, 6 batches
    config.num_train_epochs = 0.0
    config.num_train_steps = 5
    main.resolve_train_steps(config, "train")
    self.assertEqual(config.num_train_steps, 5)
    config.num_train_epochs = 1.0
    config.data.path = os.path.join(root, "missing.json")
    with self.assertRaisesRegex(cli.UserError, r"config.num_train_epochs=1 .*"
                                "missing.json"):
      main.resolve_train_steps(config, "train")

  def test_main_program_trains_the_resolved_steps(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    path = _write_sharegpt4v(root, 1020)
    # The real entry point, its training loop replaced by a print.
    code = (
        "import sys\n"
        "from fixclip_jax import cli, main, train\n"
        "train.train_and_evaluate = lambda config, workdir, **kw: print("
        "'TRAINS', config.num_train_steps)\n"
        "main.define_flags()\n"
        "cli.run(main.main, rewrite_argv=main.resolve_config_argv)\n")
    out = subprocess.run(
        [sys.executable, "-c", code, "--config=configs/longclip_b16.py",
         f"--workdir={root}/w", "--mode=train", "--config.data.type=sharegpt4v",
         f"--config.data.path={path}", "--config.data.global_batch=8",
         "--config.data.num_workers=0", "--config.model_name=tiny",
         "--config.data.image_size=32"],
        cwd=_REPO, capture_output=True, text=True, timeout=300)
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])
    # 20 pairs after the 1,000 held out: 3 batches of 8 (the last partial),
    # 6 epochs (the config's).
    self.assertIn("18 steps x batch 8 (6 epochs)", out.stdout)
    self.assertIn("TRAINS 18", out.stdout)


if __name__ == "__main__":
  absltest.main()
