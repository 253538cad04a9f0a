"""STL-10: the 5k labelled train images as instances (add the 100k unlabelled ones with
--config.train_split=unlabelled), kNN on the 8k test images; 96x96 inputs, ResNet-18."""

from instdisc_jax import default_config


def get_config():
  config = default_config.get_config()
  config.dataset = "stl10"
  config.model = "resnet18"
  config.image_size = 96
  config.augment.flip = True
  config.eval_batch_size = 512
  return config
