"""FIX-CLIP B/16 from OpenAI CLIP (docs/method.md §3): dual branch, 248-token text,
regional prompts carried between layers, GTA on groups K..G, on a long-caption manifest.

Every value is labelled: "paper" (FIX-CLIP, arXiv 2507.10095, as far as it could be
read), "Long-CLIP" (official train/train.py and train/train.md; the paper gives no
value we could read), or "ours" (the reason is in docs/method.md §3).

python -m fixclip_jax.main --config=configs/fixclip_b16.py --workdir=gs://BUCKET/run \
  --config.init_from=/ckpt/openai_b16_orbax --config.data.path=/data/train-*.array_record
"""
import math

from fixclip_jax import config_base


def get_config():
  c = config_base.base_config()
  c.model_name = "B/16"                   # paper (B/16 and L/14 from OpenAI CLIP)
  # Positions: KPS to 248, the first 20 rows frozen (paper, as Long-CLIP).
  c.model.context_length = 248
  c.model.positional_keep = 20
  # Regional prompts.
  c.model.num_prompts = 4                 # ours (M not readable)
  c.model.prompt_layers = None            # ours: every vision layer
  c.model.region_layout = "strips"        # paper: runs of floor(N/M) raster patches
  c.model.prompt_mode = "carry"           # ours: "fresh" leaves the mask inert
  # Dual branch: 75% of patches replaced by a zero-initialised learned token (paper).
  c.model.mask_token = True
  c.masking.ratio = 0.75
  c.masking.mode = "replace"
  # Hierarchical alignment.
  c.model.gta_groups = 4                  # ours (G not readable): 12 layers -> 4 x 3
  c.model.gta_sigma = 1.0                 # paper: Gaussian(j; S, 1)
  c.loss.gta_first_group = 3              # ours (K not readable)
  c.loss.gta_weights = (0.5, 0.5)         # ours (w_i not readable)
  # Objective: L_long + L_short + sum w_i L_i (paper's weights 1 and 1).
  c.objective = "fixclip"
  c.loss.short_weight = 1.0               # paper
  c.loss.pcm = False                      # paper: no PCM term (Long-CLIP's; an option)
  c.loss.label_smoothing = 0.1            # Long-CLIP
  c.init_logit_scale = math.log(100.0)    # Long-CLIP: reset to ln 100 (4.6052)
  c.loss.max_logit_scale = None           # Long-CLIP: never capped
  # Optimizer: Long-CLIP's (train/train.md), plus our lr for the new parameters.
  c.optim.lr = 1e-6                       # Long-CLIP
  c.optim.new_params_lr = 1e-4            # ours: prompts, mask token, GTA heads
  c.optim.b1 = 0.9                        # Long-CLIP
  c.optim.b2 = 0.999                      # Long-CLIP
  c.optim.eps = 1e-8                      # Long-CLIP
  c.optim.weight_decay = 1e-2             # Long-CLIP, on every parameter:
  c.optim.no_decay_regex = ""
  c.optim.grad_clip = 0.0                 # Long-CLIP: no clipping
  c.optim.warmup_steps = 200              # Long-CLIP, then cosine
  # Data and length.
  c.data.type = "array_record"
  c.data.image_size = 224                 # OpenAI B/16's resolution
  c.data.transform = "resize_center_crop"  # Long-CLIP: no augmentation
  c.data.short_caption = "provided"       # ours: the manifest's, else the first sentence
  # Long-CLIP: 2048; the negatives come from the global batch (accum_steps does
  # not add any), so keep it at 2048 whatever the device count.
  c.data.global_batch = 2048
  c.data.num_workers = 8
  # Long-CLIP: 6 epochs of whatever data.path holds (main.py sets
  # num_train_steps = ceil(6 * ceil(pairs / 2048)), config_base.steps_for_epochs);
  # ShareGPT4V's 1,245,901 training pairs give 609 x 6 = 3654, the fallback.
  c.num_train_epochs = 6
  c.num_train_steps = 3654
  c.checkpoint_every = 500
  c.eval_every = 500
  c.eval.datasets = "urban1k,sharegpt4v_1k,coco_val2017"
  return c
