"""FIX-CLIP B/16 (configs/fixclip_b16.py: global batch 2048) on one GPU:
gradient caching (optim.grad_cache_chunks) runs both branches' towers 128
rows at a time and keeps every one of the 2048 negatives of L_long, L_short
and the GTA losses; step.py's grad_cache_value_and_grad. The same gradients
as the multi-GPU run, ~4/3 the compute (the towers' forward runs twice);
memory: README "Fine-tune on one GPU".

python -m fixclip_jax.main --config=fixclip_b16_1gpu --workdir=DIR \
  --config.init_from=/ckpt/openai_b16_248 --config.data.path='/data/train-*.array_record'
"""
from fixclip_jax import config_base


def get_config():
  c = config_base.load_config_file("fixclip_b16")
  c.optim.grad_cache_chunks = 16          # 2048 / 16 = 128 rows per chunk
  return c
