"""A few steps of a tiny network on tiny data, for tests and smoke runs (runlocal)."""

from instdisc_jax import default_config


def get_config():
  config = default_config.get_config()
  config.dataset = "fashion_mnist"        # tests point this at an npz: file of tiny images
  config.image_size = 16
  config.model = "small_resnet"
  config.model_width = 4
  config.low_dim = 16
  config.num_negatives = 16
  config.batch_size = 16
  config.num_epochs = 2
  config.learning_rate = 0.05
  config.eval_batch_size = 32
  config.knn_k = 10
  config.checkpoint_every_steps = 4
  config.log_every_steps = 2
  config.progress_bar = False
  return config
