"""Every config field, with the reference's values (lemniscate.pytorch, CIFAR-10 ResNet-18).

Files under `configs/` start from `get_config()` here and override a few fields. Validation
(`instdisc_jax.config_validation`) rejects any key not defined here.
"""

import importlib.util
import os

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The reference setting; `configs/*.py` override what differs."""
  config = ml_collections.ConfigDict()
  config.seed = 0                         # Seeds params, bank, noise, augmentation, data order.

  # Data.
  config.dataset = "cifar10"              # tfds name, "folder:/path" or "npz:/path/file.npz".
  config.train_split = "train"            # Split whose images are the instances (bank rows).
  config.eval_dataset = ""                # Labelled kNN split; "" = `dataset` at `eval_split`.
  config.eval_split = ""                  # kNN split; "" = test (validation for imagenet2012).
  config.data_dir = ""                    # tfds data dir (GCS allowed); "" = $TFDS_DATA_DIR.
  config.image_size = 32                  # Side of the (square) network input.
  config.validation_size = 0              # Training images held out (stratified) to choose the
                                          # kNN (k, tau) on; 0 = none, tune nothing (paper).
  config.validation_seed = 0              # Picks them; apart from `seed`, so runs of several
                                          # seeds share one validation set.

  # Model.
  config.model = "cifar_resnet18"         # cifar_resnet18 | resnet18 | resnet50 | small_resnet.
  config.model_width = 0                  # Stem/first-stage width; 0 = the model's default.
  config.low_dim = 128                    # Embedding dimension d (bank row size).
  config.cross_device_bn = False          # BatchNorm statistics over all devices, not per device.
  config.head_batchnorm = False           # BatchNorm on the embedding before L2 norm (not ref.).
  config.compute_dtype = "float32"        # float32 | bfloat16 for the encoder; loss is float32.

  # Instance discrimination.
  config.objective = "nce"                # nce | softmax | parametric_softmax | infonce.
  config.num_negatives = 4096             # m, noise samples per example (nce, infonce).
  config.shared_noise = False             # One noise set for the whole batch (a GEMM; faster).
  config.temperature = 0.07               # tau in exp(v^T f / tau).
  config.bank_momentum = 0.5              # Weight of the OLD bank row in the update (reference).
  config.bank_init = "uniform"            # uniform (reference) | unit | features (initial net).
  config.bank_dtype = "float32"           # float32 | bfloat16 bank storage.
  config.z_mode = "frozen"                # NCE partition Z: frozen (reference) | ema | batch.
  config.z_momentum = 0.99                # EMA momentum of Z when z_mode = ema.
  config.proximal_weight = 0.0            # lambda of the proximal term (paper Eq. 9); 0 = off.

  # Optimisation.
  config.batch_size = 128                 # Global batch size (all devices and hosts).
  config.num_epochs = 200                 # Training length in epochs.
  config.num_train_steps = -1             # If > 0, stop after this many steps instead.
  config.learning_rate = 0.03             # Peak SGD learning rate.
  config.lr_schedule = "step"             # step (x decay at lr_boundaries) | cosine.
  config.lr_boundaries = (120, 160)       # Epochs where the step schedule decays.
  config.lr_decay_factor = 0.1            # Multiplier at each boundary.
  config.warmup_epochs = 0.0              # Linear warm-up from 0 (fractional epochs allowed).
  config.momentum = 0.9                   # SGD momentum.
  config.nesterov = False                 # Nesterov momentum.
  config.weight_decay = 5e-4              # L2 on all parameters, added to the gradient (torch).

  # Augmentation (on device).
  config.augment = ml_collections.ConfigDict()
  config.augment.crop_scale_min = 0.2     # RandomResizedCrop scale range (min, 1).
  config.augment.color_jitter = 0.4       # Brightness, contrast, saturation and hue strength.
  config.augment.grayscale_prob = 0.2     # RandomGrayscale probability.
  config.augment.flip = False             # RandomHorizontalFlip (the reference's CIFAR: off).

  # Evaluation.
  config.knn_k = 200                      # Neighbours in the weighted kNN.
  config.knn_temperature = 0.07           # tau of the kNN vote weights exp(s / tau).
  config.eval_every_epochs = 1            # kNN on bank features every N epochs; 0 = only at end.
  config.eval_batch_size = 1000           # Global batch for feature extraction.
  config.recompute_features = True        # Final kNN also on features recomputed without aug.
  config.knn_select_k = (10, 20, 50, 100, 200)  # Final kNN's k grid, chosen on validation
                                                # (k above n counts as n).
  config.knn_select_temperatures = (0.02, 0.03, 0.05, 0.07, 0.1)  # Its tau grid (likewise).

  # Checkpoints and logs.
  config.checkpoint_every_steps = 2000    # Save every N steps (and at the end); 0 = end only.
  config.keep_checkpoints = 2             # Checkpoints kept on disk.
  config.log_every_steps = 50             # Metrics to TensorBoard/metrics.jsonl every N steps.
  config.progress_bar = True              # tqdm bar with ETA, loss and images/s.
  return config


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file given by path (how one file in configs/ derives another)."""
  spec = importlib.util.spec_from_file_location(
      f"instdisc_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
