"""Paper Table 2: ImageNet ResNet-18 (torchvision layout); otherwise as imagenet_resnet50."""

import os

from instdisc_jax import default_config


def get_config():
  config = default_config.load_config_file(
      os.path.join(os.path.dirname(__file__), "imagenet_resnet50.py"))
  config.model = "resnet18"
  return config
