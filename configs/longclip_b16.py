"""Long-CLIP B/16 as published (method.md §2): KPS to 248 positions, PCM on
the short branch, L_long + L_short, AdamW lr 1e-6, wd 1e-2 on all parameters,
200 warmup steps + cosine, global batch 2048, label smoothing 0.1, no augmentation.
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
  c.loss.short_weight = 1.0
  c.optim.no_decay_regex = ""             # Long-CLIP decays every parameter
  c.optim.new_params_regex = ""
  c.data.type = "array_record"
  c.data.image_size = 224
  c.data.transform = "resize_center_crop"
  c.data.short_caption = "first_sentence"
  c.data.global_batch = 2048
  c.data.num_workers = 8
  c.num_train_steps = 600                 # ~1 epoch of ShareGPT4V 1.2M
  c.checkpoint_every = 200
  c.eval_every = 200
  c.eval.datasets = "urban1k,sharegpt4v_1k,coco_val2017"
  return c
