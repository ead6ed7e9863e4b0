"""Long-CLIP L/14 (method.md §2): longclip_b16.py with the L/14 towers."""
import importlib.util
import os


def get_config():
  # The B/16 file holds every Long-CLIP choice; load it by path so this config
  # works from any working directory.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "longclip_b16.py")
  spec = importlib.util.spec_from_file_location("longclip_b16", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model_name = "L/14"
  c.remat = "full"
  return c
