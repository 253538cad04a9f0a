"""Paper Table 2: ImageNet ResNet-50, NCE m = 4096, tau = 0.07, batch 256, 200 epochs.

Paper: kNN top-1 46.5%, linear 54.0%. On a TPU pod raise batch_size and learning_rate together.
"""

from instdisc_jax import default_config


def get_config():
  config = default_config.get_config()
  config.dataset = "imagenet2012"
  config.model = "resnet50"
  config.image_size = 224
  config.batch_size = 256
  config.weight_decay = 1e-4
  config.temperature = 0.07
  config.augment.flip = True
  config.compute_dtype = "bfloat16"
  config.bank_dtype = "float32"
  config.eval_every_epochs = 10
  config.eval_batch_size = 1024
  config.checkpoint_every_steps = 5000
  config.log_every_steps = 100
  return config
