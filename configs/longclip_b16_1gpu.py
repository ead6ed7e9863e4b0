"""Long-CLIP B/16 as published (configs/longclip_b16.py: global batch 2048,
PCM per 128 rows) on one GPU: gradient caching (optim.grad_cache_chunks)
runs the towers 128 rows at a time (Long-CLIP's per-GPU batch) and keeps
every one of the 2048 negatives and the PCM groups; step.py's
grad_cache_value_and_grad. The same gradients as 16 GPUs, ~4/3 the compute
(the towers' forward runs twice); memory: README "Fine-tune on one GPU".

python -m fixclip_jax.main --config=longclip_b16_1gpu --workdir=DIR \
  --config.init_from=/ckpt/openai_b16_248 --config.data.path='/data/train-*.array_record'
"""
from fixclip_jax import config_base


def get_config():
  c = config_base.load_config_file("longclip_b16")
  c.optim.grad_cache_chunks = 16          # 2048 / 16 = 128 rows per chunk
  c.data.num_workers = 8
  return c
