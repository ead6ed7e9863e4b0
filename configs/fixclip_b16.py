"""FIX-CLIP B/16 from OpenAI CLIP (docs/method.md §3): dual branch, 248-token text,
4 regional prompts per layer, GTA on groups 3..4, on a long-caption manifest.

python -m fixclip_jax.main --config=configs/fixclip_b16.py --workdir=gs://BUCKET/run \
  --config.init_from=/ckpt/openai_b16_orbax --config.data.path=/data/train-*.array_record
"""
from fixclip_jax import config_base


def get_config():
  c = config_base.base_config()
  c.model_name = "B/16"
  c.data.type = "array_record"
  c.data.image_size = 224
  c.data.global_batch = 2048
  c.data.num_workers = 8
  c.num_train_steps = 6000                # ~10 epochs of 1.2M pairs at 2048
  c.optim.lr = 1e-6
  c.optim.new_params_lr = 1e-4
  c.optim.warmup_steps = 200
  c.checkpoint_every = 1000
  c.eval_every = 1000
  c.eval.datasets = "urban1k,sharegpt4v_1k,coco_val2017"
  return c
