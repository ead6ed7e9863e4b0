"""Long-CLIP B/16 as published (docs/method.md §2; official train/train.py and
model/model_longclip.py): KPS to 248 positions, PCM on the short branch (per
128 images), L_long + L_short, label smoothing 0.1, logit scale reset to ln 100
and never capped, AdamW with PyTorch's defaults (betas 0.9/0.999, eps 1e-8),
lr 1e-6, wd 1e-2 on all parameters, no gradient clipping, 200 warmup steps +
cosine, global batch 2048, no augmentation, 6 epochs of ShareGPT4V without its
first 1,000 entries (train/sharegpt4v.py; 3,654 steps).
"""
from fixclip_jax import config_base


def get_config():
  c = config_base.base_config()
  c.model_name = "B/16"
  c.objective = "longclip"
  c.model.num_prompts = 0
  c.model.mask_token = False
  c.model.gta_groups = 0
  c.loss.pcm = True
  c.loss.pcm_components = 32
  c.loss.pcm_group_size = 128             # Long-CLIP: PCA per GPU of 128
  c.loss.short_weight = 1.0
  c.loss.max_logit_scale = None           # Long-CLIP never caps the temperature
  c.optim.b1 = 0.9                        # torch.optim.AdamW defaults
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 1e-2
  c.optim.grad_clip = 0.0                 # no clipping
  c.optim.warmup_steps = 200
  c.optim.no_decay_regex = ""             # Long-CLIP decays every parameter
  c.optim.new_params_regex = ""
  # Shards from `prepare --src=<ShareGPT4V json>` (first 1,000 entries held
  # out); or data.type = "sharegpt4v" with data.path = the json itself.
  c.data.type = "array_record"
  c.data.image_size = 224
  c.data.transform = "resize_center_crop"
  c.data.short_caption = "first_sentence"
  c.data.global_batch = 2048
  c.data.num_workers = 8
  # 6 epochs (train/train.md's recommended settings) over whatever data.path
  # holds: main.py sets num_train_steps = ceil(6 * ceil(pairs / 2048))
  # (config_base.steps_for_epochs; Long-CLIP: epochs * len(train_loader)).
  # ShareGPT4V's 1,245,901 training pairs (its first 1,000 held out) give
  # 6 * 609 = 3,654; the value below is that, for callers that do not resolve.
  c.num_train_epochs = 6
  c.num_train_steps = 3654
  c.checkpoint_every = 200
  c.eval_every = 200
  c.eval.datasets = "urban1k,sharegpt4v_1k,coco_val2017"
  return c
