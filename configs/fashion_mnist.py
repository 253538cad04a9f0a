"""The default job: Fashion-MNIST on a laptop CPU in minutes (tuned choices documented in
docs/fashion_mnist.md)."""

from instdisc_jax import default_config


def get_config():
  config = default_config.get_config()
  config.dataset = "fashion_mnist"
  config.image_size = 28
  config.model = "small_resnet"
  config.objective = "nce"
  config.num_negatives = 4096
  config.shared_noise = True
  config.z_mode = "batch"
  config.bank_init = "features"
  config.temperature = 0.1
  config.knn_temperature = 0.1
  config.batch_size = 128
  config.num_epochs = 10
  config.learning_rate = 0.06
  config.lr_schedule = "cosine"
  config.warmup_epochs = 0.5
  config.augment.flip = True
  config.eval_every_epochs = 2
  config.checkpoint_every_steps = 1000
  return config
