"""Every knob of a run, named once with its default (big_vision style).

Config files in configs/ start from `base_config()` and change what differs;
any knob can be overridden on the command line: `--config.optim.lr=1e-5`.
"""
import importlib.util
import math
import os
import re
from typing import Any, List

import ml_collections
from ml_collections import config_dict

# Only the caption-filter thresholds and ShareGPT4V's holdout: captions.py and
# sharegpt4v.py import nothing heavy, so configs load without grain/PIL.
from fixclip_jax.data import captions
from fixclip_jax.data import sharegpt4v


# FIX-CLIP's additions off: the knobs that make a config plain CLIP (the
# 77-token start of pretrain77.py, tools/ablate.py's baselines, tools/bench.py's twin).
PLAIN_CLIP = {"model.num_prompts": 0, "model.mask_token": False,
              "model.gta_groups": 0}


def set_knob(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config["a.b.c"] = value."""
  *parents, name = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[name] = value


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # --- Model (fixclip_jax/models/sizes.py): a size name + overrides (any
  # CLIPConfig field: c.model.vision_layers = 4, ...; these are FIX-CLIP's).
  c.model_name = "B/16"
  c.model = ml_collections.ConfigDict()
  c.model.context_length = 248            # Long-CLIP's stretched context (§2)
  c.model.positional_keep = 20            # two-table positions; None = one table
  c.model.num_prompts = 4                 # FIX-CLIP regional prompts per layer (§3)
  c.model.prompt_layers = config_dict.placeholder(tuple)  # (start, stop); None = all
  c.model.region_layout = "strips"        # strips (the paper's) | grid (§3)
  c.model.prompt_mode = "carry"           # carry | fresh (inert control; §3)
  c.model.mask_token = True               # learnable token for masked patches
  c.model.gta_groups = 4                  # hierarchical groups G (0 = none)
  c.model.gta_sigma = 1.0
  c.model.vocab_size = 49408              # CLIP BPE; a SentencePiece model's size
  c.model.eot_token_id = config_dict.placeholder(int)  # None = pool at argmax(ids)
  c.dtype = "bfloat16"                    # compute dtype; params stay float32
  c.attn_implementation = ""              # "" (XLA picks) | xla | cudnn
  c.remat = "none"                        # none | full | dots | dots_saveable
  # --- Objective (fixclip_jax/losses.py).
  c.objective = "fixclip"                 # clip | longclip | fixclip
  c.loss = ml_collections.ConfigDict()
  c.loss.label_smoothing = 0.1            # Long-CLIP's value (§2)
  c.loss.short_weight = 1.0               # L_long + w * L_short
  c.loss.gta_weights = (0.5, 0.5)         # w_i for groups K..G (§3)
  c.loss.gta_first_group = 3              # K
  c.loss.pcm = False                      # primary-component matching (§2)
  c.loss.pcm_components = 32
  c.loss.pcm_group_size = 128             # rows per PCA (Long-CLIP: 128 per GPU)
  c.loss.max_logit_scale = math.log(100.0)  # cap on logit_scale; None = none (Long-CLIP)
  c.masking = ml_collections.ConfigDict()
  c.masking.ratio = 0.75                  # share of patches masked (short branch)
  c.masking.mode = "replace"              # replace (mask token) | drop (MAE-style)
  # --- Data (fixclip_jax/data/pipeline.py reads config.data).
  c.data = ml_collections.ConfigDict()
  # Where the examples come from (data/sources.py, make_source).
  c.data.type = "jsonl"                   # jsonl | tar | array_record | tfds | synthetic | sharegpt4v
  c.data.path = ""                        # manifest | shard glob/folder/comma list | tfds name | json
  # type=sharegpt4v: its first entries, never trained on (data/sharegpt4v.py:
  # 1000 = the sharegpt4v_1k evaluation split, as Long-CLIP).
  c.data.holdout_first = sharegpt4v.EVAL_HOLDOUT
  c.data.image_root = ""                  # jsonl: root of relative image paths ("" = manifest dir)
  c.data.tfds_split = "train"
  c.data.tfds_data_dir = ""
  c.data.tfds_image_key = "image"
  c.data.tfds_caption_key = "caption"     # "/"-path into nested features
  c.data.synthetic_num = 1024             # type=synthetic: scenes rendered in memory
  c.data.synthetic_image_size = 64
  c.data.synthetic_seed = 0
  # Share of scene pairs that differ only after token 77 (data/synthetic.py).
  c.data.synthetic_late_detail_share = 0.5
  # Images (data/transforms.py).
  c.data.image_size = 224
  c.data.transform = "resize_center_crop"  # | random_resized_crop (train only)
  c.data.rrc_scale = (0.9, 1.0)           # random_resized_crop area share range
  c.data.rrc_ratio = (3 / 4, 4 / 3)       # random_resized_crop aspect ratio range
  # random_resized_crop decodes JPEGs at 1/2..1/8 scale when the crop stays
  # >= image_size px (transforms.decode_random_resized_crop): ~1.7x faster.
  c.data.rrc_jpeg_draft = True
  # Text (data/tokenizers.py, data/captions.py).
  # "clip" (CLIP's BPE) | path to a SentencePiece .model file; with the latter
  # set model.vocab_size and model.eot_token_id (its eos id) to match.
  c.data.tokenizer = "clip"
  c.data.text_context = 248               # long captions (Long-CLIP's stretched context)
  c.data.short_caption = "provided"       # | first_sentence
  c.data.short_context = 0                # 0 = text_context
  # Exact length buckets (fixclip_jax/buckets.py): each train batch's text is
  # cut to the smallest bucket holding its longest caption (same features and
  # loss; one compiled step per bucket pair); () = off. Eval and embed use the
  # union of both lists.
  c.data.long_buckets = (64, 96, 128, 160, 192, 224, 248)
  c.data.short_buckets = (16, 32, 48, 64, 77)
  c.data.filter_captions = False          # drop examples failing captions.filter_reason
  # Thresholds of those filters; the defaults are captions.CaptionFilterConfig's.
  c.data.filters = ml_collections.ConfigDict(captions.filter_thresholds())
  c.data.max_caption_chars = 20000        # longer captions are bad data (skipped)
  # Bad data (pipeline.py docstring) is skipped and counted, unless this is set.
  c.data.raise_on_bad_data = False        # True: raise on the first bad example (debug)
  c.data.max_consecutive_skips = 1000     # more bad examples in a row raise
  # A record whose read takes longer is skipped ("read_timeout": a FIFO, a
  # stalled mount); 0 = wait forever.
  c.data.read_timeout_s = 60.0
  # Larger images are decoded reduced when JPEG (1/2..1/8, libjpeg's DCT
  # scaling) or JPEG 2000, else skipped ("image_too_large"); 0 = no limit.
  c.data.max_image_pixels = 40_000_000
  # Order and batching.
  c.data.global_batch = 256               # split evenly over hosts
  c.data.shuffle_seed = 0
  c.data.num_epochs = 0                   # 0 = repeat forever
  # Throughput.
  c.data.num_workers = 0                  # grain worker processes (0 = in this process)
  c.data.worker_buffer_size = 2           # batches each worker prepares ahead
  c.data.read_threads = 4                 # threads loading examples in each process
  c.data.prefetch_buffer = 64             # examples those threads keep ready
  # --- Optimisation (fixclip_jax/train.py).
  c.num_train_steps = 1000                # micro-steps (= updates * accum_steps)
  # > 0: num_train_steps = steps_for_epochs(this, the training source's
  # length, data.global_batch), resolved by main.py; 0 = num_train_steps.
  c.num_train_epochs = 0.0
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-6                       # Long-CLIP's lr for CLIP weights
  c.optim.new_params_lr = 1e-4            # prompts, mask token, GTA heads
  c.optim.weight_decay = 1e-2
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.warmup_steps = 200
  c.optim.grad_clip = 1.0                 # global norm; 0 = off
  c.optim.accum_steps = 1
  # Gradient caching (step.grad_cache_value_and_grad): the towers run the
  # batch in N chunks, the loss sees the whole batch's negatives; memory of
  # activations ~ 1/N, ~4/3 the step time. 1 = off. accum_steps instead
  # averages per-micro-batch losses (fewer negatives).
  c.optim.grad_cache_chunks = 1
  c.skip_nonfinite = True                 # skip updates of NaN/Inf steps (logged)
  # That many skipped updates in a row stop the run (divergence: lower the lr;
  # exit 3, the checkpoints kept: a skipped update changes nothing). 0 = never.
  c.optim.max_skipped_updates = 20
  c.optim.frozen_regex = r"text/positional_embedding"  # the frozen table (§2)
  c.optim.new_params_regex = r".*(prompts_\d+|mask_token|/gta/.*)"
  c.optim.no_decay_regex = (r".*(/bias|/scale|logit_scale|class_embedding|"
                            r"positional_embedding.*|token_embedding|mask_token|prompts_\d+)")
  # --- Distribution (fixclip_jax/sharding.py).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                        # -1 = all devices not used by fsdp
  c.mesh.fsdp = 1
  c.sharding_rules = ()                   # ((regex, spec | "replicate"), ...)
  c.distributed = "auto"                  # auto | on | off: jax.distributed.initialize
  # --- Initialisation (fixclip_jax/checkpoint.py).
  c.init_from = ""                        # orbax dir | .pt/.safetensors | HF dir
  c.init_logit_scale = math.log(100.0)    # Long-CLIP resets it to ln 100; 0 = keep
  # Without a pretrained CLIP (the demo): steps > 0 first trains plain CLIP at
  # 77 tokens on this run's data in WORKDIR/pretrain77 (pretrain77.py), then
  # this run starts from it as from init_from (KPS to 248, frozen rows).
  c.pretrain77 = ml_collections.ConfigDict()
  c.pretrain77.steps = 0                  # 0 = off; needs init_from = ""
  c.pretrain77.lr = 1e-3                  # from scratch
  # --- Loop, checkpoints, metrics, evaluation.
  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  # Resume from this saved step instead of the latest (0 = the latest). Later
  # checkpoints are deleted once it is restored: orbax cannot save over them.
  c.resume_step = 0
  c.checkpoint_best_metric = ""           # e.g. "eval/synthetic-long/t2i_R@1"
  c.peak_tflops = 0.0                     # per device, for MFU; 0 = by device kind
  c.eval_every = 500                      # 0 = only at the end
  c.eval_at_start = False                 # also score the initial model (step 0)
  c.eval = ml_collections.ConfigDict()
  c.eval.datasets = "synthetic"           # comma list, see evaluation/datasets.py
  c.eval.root = ""                        # data root (synthetic: a manifest dir)
  c.eval.batch_size = 256
  c.eval.synthetic_num = 256              # synthetic eval set when root is ""
  # --- Optional Weights & Biases logging (metrics.py); off unless a project is set.
  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ""                    # "" = off; needs `pip install wandb`
  c.wandb.entity = ""
  c.wandb.name = ""                       # run name; "" = the workdir's name
  c.wandb.mode = "online"                 # online | offline
  return c


def steps_for_epochs(epochs: float, num_pairs: int, global_batch: int) -> int:
  """Steps of `epochs` passes over `num_pairs` at `global_batch`: Long-CLIP's
  count (train/train.py: epochs * len(train_loader), a DataLoader without
  drop_last, so a partial last batch is a step): 6 epochs of 1,245,901 pairs
  at 2,048 = 6 * 609 = 3,654."""
  if num_pairs < 1 or global_batch < 1 or epochs < 0:
    raise ValueError(f"steps_for_epochs: epochs={epochs}, pairs={num_pairs}, "
                     f"batch={global_batch}: need epochs >= 0 and pairs, "
                     "batch >= 1")
  per_epoch = -(-num_pairs // global_batch)
  # round(): 0.1 * 610 is 61.00000000000001 in floats, one step too many.
  return math.ceil(round(epochs * per_epoch, 6))


def config_dirs() -> List[str]:
  """Where configs named by name live: the installed package's
  `fixclip_jax.configs` (pyproject maps configs/ there), else the checkout's
  configs/ next to the package."""
  dirs = []
  spec = importlib.util.find_spec("fixclip_jax.configs")
  if spec is not None and spec.submodule_search_locations:
    dirs += list(spec.submodule_search_locations)
  checkout = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs")
  if os.path.isdir(checkout) and checkout not in dirs:
    dirs.append(checkout)
  return dirs


def config_names() -> List[str]:
  """The names `--config=NAME` accepts (demo, fixclip_b16, ...)."""
  return sorted({f[:-3] for d in config_dirs() for f in os.listdir(d)
                 if f.endswith(".py") and not f.startswith("_")})


def resolve_config_file(name_or_path: str) -> str:
  """The path of a config file given as a path or a bare name (`demo`)."""
  if os.path.isfile(name_or_path):
    return name_or_path
  name = name_or_path[:-3] if name_or_path.endswith(".py") else name_or_path
  if re.fullmatch(r"\w+", name):
    for directory in config_dirs():
      candidate = os.path.join(directory, name + ".py")
      if os.path.isfile(candidate):
        return candidate
  raise FileNotFoundError(f"No config file at {name_or_path} and no packaged "
                          f"config of that name (names: {', '.join(config_names())})")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """get_config() of a config file, by path or by name as --config takes it."""
  path = resolve_config_file(path)
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"fixclip_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
