"""CIFAR-100 with the CIFAR-10 recipe (ResNet-18, NCE m = 4096, 200 epochs)."""

from instdisc_jax import default_config


def get_config():
  config = default_config.get_config()
  config.dataset = "cifar100"
  config.model = "cifar_resnet18"
  config.image_size = 32
  return config
