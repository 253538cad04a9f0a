"""Every config field, with the reference's values (lemniscate.pytorch, CIFAR-10 ResNet-18).

Files under `configs/` start from `get_config()` here and override a few fields. The fields,
their defaults, docs and rules are declared once, in `instdisc_jax.config_schema`; validation
(`instdisc_jax.config_validation`) rejects any key not defined there.
"""

import importlib.util
import os

import ml_collections

from instdisc_jax import config_schema


def get_config() -> ml_collections.ConfigDict:
  """The reference setting (`config_schema.SCHEMA`'s defaults); `configs/*.py` override what
  differs."""
  return config_schema.SCHEMA.defaults()


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file given by path (how one file in configs/ derives another)."""
  spec = importlib.util.spec_from_file_location(
      f"instdisc_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
