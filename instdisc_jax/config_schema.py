"""The training config's schema: every field's default, doc and rule, declared once.

The defaults are the reference's (lemniscate.pytorch, CIFAR-10 ResNet-18); files under
`configs/` start from `default_config.get_config()`, derived from `SCHEMA`, and override a few.
What else reads the schema:

* `config_validation.validate` checks keys and values with the rules here;
* `steps.StepConfig.from_config` takes the fields tagged `step` (the train step's static
  configuration), so a new step hyper-parameter is declared here and nowhere else;
* `config_io.run_meta` takes the fields tagged `identity` (what a checkpoint's shapes and
  meaning depend on); changing that set changes which workdirs resume.
"""

from instdisc_jax import models
from instdisc_jax import objectives
from instdisc_jax.config_fields import DTYPES
from instdisc_jax.config_fields import Boolean
from instdisc_jax.config_fields import Choice
from instdisc_jax.config_fields import Dataset
from instdisc_jax.config_fields import Epochs
from instdisc_jax.config_fields import Grid
from instdisc_jax.config_fields import Integer
from instdisc_jax.config_fields import Number
from instdisc_jax.config_fields import Schema
from instdisc_jax.config_fields import Text
from instdisc_jax.config_fields import field

PROBABILITY = Number(0, 1)
MOMENTUM = Number(0, 1, high_open=True)
POSITIVE = Number(0, low_open=True)
NON_NEGATIVE = Number(0)

SCHEMA = Schema(
    seed=field(0, Integer(0, 2**63 - 1), "Seeds params, bank, noise, augmentation, data order."),

    # Data.
    dataset=field("cifar10", Dataset(), 'tfds name, "folder:/path" or "npz:/path/file.npz".',
                  identity=True),
    train_split=field("train", Text(nonempty=True),
                      "Split whose images are the instances (bank rows)."),
    eval_dataset=field("", Dataset(optional=True),
                       'Labelled kNN split; "" = `dataset` at `eval_split`.'),
    eval_split=field("", Text(), 'kNN split; "" = test (validation for imagenet2012).'),
    data_dir=field("", Text(), 'tfds data dir (GCS allowed); "" = $TFDS_DATA_DIR.'),
    image_size=field(32, Integer(8, 1024), "Side of the (square) network input.", identity=True),
    validation_size=field(0, Integer(0), "Training images held out (stratified) to choose the "
                          "kNN (k, tau) on; 0 = none, tune nothing (paper)."),
    validation_seed=field(0, Integer(0, 2**63 - 1), "Picks them; apart from `seed`, so runs of "
                          "several seeds share one validation set."),

    # Model.
    low_dim=field(128, Integer(1, 65536), "Embedding dimension d (bank row size).",
                  identity=True),
    model=field("cifar_resnet18", Choice(tuple(models.MODELS)),
                "cifar_resnet18 | resnet18 | resnet50 | small_resnet.", identity=True),
    model_width=field(0, Integer(0, 4096), "Stem/first-stage width; 0 = the model's default.",
                      identity=True),
    cross_device_bn=field(False, Boolean(),
                          "BatchNorm statistics over all devices, not per device."),
    head_batchnorm=field(False, Boolean(), "BatchNorm on the embedding before L2 norm (not ref.).",
                         identity=True),
    compute_dtype=field("float32", Choice(DTYPES),
                        "float32 | bfloat16 for the encoder; loss is float32."),

    # Instance discrimination.
    objective=field("nce", Choice(tuple(objectives.OBJECTIVES)),
                    "nce | softmax | parametric_softmax | infonce.", step=True, identity=True),
    num_negatives=field(4096, Integer(1), "m, noise samples per example (nce, infonce).",
                        step=True),
    shared_noise=field(False, Boolean(), "One noise set for the whole batch (a GEMM; faster).",
                       step=True),
    temperature=field(0.07, POSITIVE, "tau in exp(v^T f / tau).", step=True),
    bank_momentum=field(0.5, MOMENTUM, "Weight of the OLD bank row in the update (reference).",
                        step=True),
    bank_init=field("uniform", Choice(("uniform", "unit", "features")),
                    "uniform (reference) | unit | features (initial net)."),
    bank_dtype=field("float32", Choice(DTYPES), "float32 | bfloat16 bank storage.",
                     identity=True),
    z_mode=field("frozen", Choice(tuple(objectives.Z_MODES)),
                 "NCE partition Z: frozen (reference) | ema | batch.", step=True),
    z_momentum=field(0.99, MOMENTUM, "EMA momentum of Z when z_mode = ema.", step=True),
    proximal_weight=field(0.0, NON_NEGATIVE, "lambda of the proximal term (paper Eq. 9); 0 = off.",
                          step=True),

    # Optimisation.
    batch_size=field(128, Integer(1), "Global batch size (all devices and hosts).",
                     step="global_batch"),
    num_epochs=field(200, Integer(1), "Training length in epochs."),
    num_train_steps=field(-1, Integer(-1), "If > 0, stop after this many steps instead."),
    learning_rate=field(0.03, POSITIVE, "Peak SGD learning rate."),
    lr_schedule=field("step", Choice(("step", "cosine")),
                      "step (x decay at lr_boundaries) | cosine."),
    lr_boundaries=field((120, 160), Epochs(), "Epochs where the step schedule decays."),
    lr_decay_factor=field(0.1, Number(0, 1, low_open=True), "Multiplier at each boundary."),
    warmup_epochs=field(0.0, NON_NEGATIVE,
                        "Linear warm-up from 0 (fractional epochs allowed)."),
    momentum=field(0.9, MOMENTUM, "SGD momentum."),
    nesterov=field(False, Boolean(), "Nesterov momentum."),
    weight_decay=field(5e-4, NON_NEGATIVE,
                       "L2 on all parameters, added to the gradient (torch)."),

    # Augmentation (on device).
    augment=Schema(
        crop_scale_min=field(0.2, Number(0, 1, low_open=True),
                             "RandomResizedCrop scale range (min, 1)."),
        color_jitter=field(0.4, Number(0, 0.5),
                           "Brightness, contrast, saturation and hue strength."),
        grayscale_prob=field(0.2, PROBABILITY, "RandomGrayscale probability."),
        flip=field(False, Boolean(), "RandomHorizontalFlip (the reference's CIFAR: off)."),
    ),

    # Evaluation.
    knn_k=field(200, Integer(1), "Neighbours in the weighted kNN.", step=True),
    knn_temperature=field(0.07, POSITIVE, "tau of the kNN vote weights exp(s / tau).",
                          step=True),
    eval_every_epochs=field(1, Integer(0),
                            "kNN on bank features every N epochs; 0 = only at end."),
    eval_batch_size=field(1000, Integer(1), "Global batch for feature extraction."),
    recompute_features=field(True, Boolean(),
                             "Final kNN also on features recomputed without aug."),
    knn_select_k=field((10, 20, 50, 100, 200), Grid(Integer(1)),
                       "Final kNN's k grid, chosen on validation (k above n counts as n)."),
    knn_select_temperatures=field((0.02, 0.03, 0.05, 0.07, 0.1), Grid(POSITIVE),
                                  "Its tau grid (likewise)."),

    # Checkpoints and logs.
    checkpoint_every_steps=field(2000, Integer(0),
                                 "Save every N steps (and at the end); 0 = end only."),
    keep_checkpoints=field(2, Integer(1), "Checkpoints kept on disk."),
    log_every_steps=field(50, Integer(1), "Metrics to TensorBoard/metrics.jsonl every N steps."),
    progress_bar=field(True, Boolean(), "tqdm bar with ETA, loss and images/s."),
)

# {steps.StepConfig attribute: config field} and the fields of `config_io.run_meta`.
STEP_FIELDS = SCHEMA.step_fields()
IDENTITY_FIELDS = SCHEMA.identity_fields()
