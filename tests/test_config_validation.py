"""Config validation: every field has a rule, invalid configs fail with one line naming the field,
valid ones build a train step.

The property tests mutate configs/tiny.py: invalid values are derived from each field's rule in
`config_schema.SCHEMA` (wrong types, out-of-range values, unknown names) plus the values that
break a relation (batch size and device count, m < n, k <= n, warm-up < epochs); valid values
come from `VALID`. A valid config's train step is traced with `jax.eval_shape` on 8 devices
(nothing is compiled), once per distinct setting of the fields that shape the step.
"""

import dataclasses
import math
import os

from hypothesis import HealthCheck
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import ml_collections
import pytest
import tiny_run

from instdisc_jax import config_fields as cf
from instdisc_jax import config_io
from instdisc_jax import config_schema
from instdisc_jax import config_validation as cv
from instdisc_jax import default_config
from instdisc_jax import steps
from instdisc_jax import train
from instdisc_jax.errors import ConfigError
from instdisc_jax.sharding import ShardLayout

NUM_DEVICES = 8
N = 64                                             # training images of the test .npz
CONFIGS = os.path.join(tiny_run.REPO, "configs")
FIELDS = dict(config_schema.SCHEMA.fields())       # dotted name -> Field

# Where the data lives: not mutated (a valid value needs a dataset on disk).
DATA_FIELDS = ("dataset", "train_split", "eval_dataset", "eval_split", "data_dir")

floats = lambda low, high: st.floats(low, high, allow_nan=False)   # noqa: E731
VALID = {
    "seed": st.integers(0, 2**63 - 1),
    "image_size": st.sampled_from([8, 16]),
    "validation_size": st.integers(0, 16),
    "validation_seed": st.integers(0, 2**63 - 1),
    "model": st.sampled_from(["small_resnet", "cifar_resnet18"]),
    "model_width": st.sampled_from([0, 2, 4]),
    "low_dim": st.sampled_from([1, 8, 16]),
    "cross_device_bn": st.booleans(),
    "head_batchnorm": st.booleans(),
    "compute_dtype": st.sampled_from(cf.DTYPES),
    "objective": st.sampled_from(FIELDS["objective"].rule.choices),
    "num_negatives": st.integers(1, N - 1),
    "shared_noise": st.booleans(),
    "temperature": floats(1e-3, 10),
    "bank_momentum": floats(0, 0.999),
    "bank_init": st.sampled_from(FIELDS["bank_init"].rule.choices),
    "bank_dtype": st.sampled_from(cf.DTYPES),
    "z_mode": st.sampled_from(FIELDS["z_mode"].rule.choices),
    "z_momentum": floats(0, 0.999),
    "proximal_weight": st.sampled_from([0.0, 0.5]),
    "batch_size": st.sampled_from([8, 16, 32, 64]),
    "num_epochs": st.integers(1, 5),
    "num_train_steps": st.one_of(st.just(-1), st.integers(1, 10_000)),
    "learning_rate": floats(1e-4, 10),
    "lr_schedule": st.sampled_from(FIELDS["lr_schedule"].rule.choices),
    "lr_boundaries": st.lists(floats(0.5, 500), max_size=3).map(lambda v: tuple(sorted(v))),
    "lr_decay_factor": floats(0.01, 1),
    "warmup_epochs": floats(0, 0.9),
    "momentum": floats(0, 0.99),
    "nesterov": st.booleans(),
    "weight_decay": floats(0, 0.01),
    "augment.crop_scale_min": floats(0.05, 1),
    "augment.color_jitter": floats(0, 0.5),
    "augment.grayscale_prob": floats(0, 1),
    "augment.flip": st.booleans(),
    "knn_k": st.integers(1, N),
    "knn_temperature": floats(1e-3, 1),
    "eval_every_epochs": st.integers(0, 3),
    "eval_batch_size": st.sampled_from([8, 32, 1000]),
    "recompute_features": st.booleans(),
    "knn_select_k": st.lists(st.integers(1, 2 * N), min_size=1, max_size=4,
                             unique=True).map(tuple),
    "knn_select_temperatures": st.lists(floats(1e-3, 1), min_size=1, max_size=4,
                                        unique=True).map(tuple),
    "checkpoint_every_steps": st.integers(0, 100),
    "keep_checkpoints": st.integers(1, 5),
    "log_every_steps": st.integers(1, 100),
    "progress_bar": st.booleans(),
}
# The fields that change the traced train step's shapes or program.
STEP_SHAPING = ("image_size", "model", "model_width", "low_dim", "cross_device_bn",
                "head_batchnorm", "compute_dtype", "objective", "num_negatives", "shared_noise",
                "bank_dtype", "z_mode", "batch_size")


# -- invalid values, from the rules ----------------------------------------------------------------

NOT_A_NUMBER = st.one_of(st.none(), st.text(max_size=4), st.booleans(),
                         st.just(math.nan), st.just(math.inf), st.just(-math.inf), st.just([1]))


def invalid_values(field: str) -> st.SearchStrategy:
  """Values that `FIELDS[field]` rejects, or that break a relation with another field."""
  rule = FIELDS[field].rule
  options = []
  if isinstance(rule, cf.Integer):
    options.append(st.one_of(NOT_A_NUMBER, st.floats(-5, 5).filter(lambda v: v != int(v)),
                             st.just(2.0)))
    if rule.low is not None:
      options.append(st.integers(max_value=rule.low - 1))
    if rule.high is not None:
      options.append(st.integers(min_value=rule.high + 1))
  elif isinstance(rule, cf.Number):
    options.append(NOT_A_NUMBER)
    if rule.low is not None:
      options.append(st.floats(max_value=rule.low, exclude_max=not rule.low_open,
                               allow_infinity=False, allow_nan=False))
    if rule.high is not None:
      options.append(st.floats(min_value=rule.high, exclude_min=not rule.high_open,
                               allow_infinity=False, allow_nan=False))
  elif isinstance(rule, cf.Choice):
    options.append(st.one_of(st.text(max_size=12).filter(lambda v: v not in rule.choices),
                             st.none(), st.integers(), st.just(rule.choices[0].upper())))
  elif isinstance(rule, cf.Boolean):
    options.append(st.one_of(st.sampled_from([0, 1, "True", "yes", None]), st.floats()))
  elif isinstance(rule, cf.Text):
    options.append(st.one_of(st.none(), st.integers(), st.just(["train"])))
    if rule.nonempty:
      options.append(st.just(""))
  elif isinstance(rule, cf.Dataset):
    options.append(st.one_of(
        st.none(), st.integers(), st.sampled_from(["npz:", "folder:", "cifar-10", "imagenet"]),
        st.text(max_size=12).filter(lambda v: v not in cf.TFDS_DATASETS and v != ""
                                    and not v.startswith(cf.DATASET_PREFIXES))))
    if not rule.optional:
      options.append(st.just(""))
  elif isinstance(rule, cf.Epochs):
    options.append(st.one_of(
        st.none(), st.just(120), st.just("120,160"), st.just((160, 120)),
        st.lists(st.floats(max_value=0, allow_nan=False), min_size=1, max_size=3)))
  elif isinstance(rule, cf.Grid):
    good = (1, 2) if isinstance(rule.item, cf.Integer) else (0.05, 0.1)
    options.append(st.one_of(st.none(), st.just(()), st.just(good[0]),
                             st.just(good + good[:1]), st.just(good + (0,))))
  else:
    raise AssertionError(f"no invalid values for rule {rule!r} of {field}")
  options.extend(RELATION_BREAKERS.get(field, []))
  return st.one_of(options)


RELATION_BREAKERS = {
    "batch_size": [st.integers(1, 200).filter(lambda v: v % NUM_DEVICES),
                   st.integers(N + 1, 10**6).map(lambda v: v * NUM_DEVICES)],
    "eval_batch_size": [st.integers(1, 10**6).filter(lambda v: v % NUM_DEVICES)],
    "num_negatives": [st.integers(N, 10**6)],
    "knn_k": [st.integers(N + 1, 10**6)],
    "warmup_epochs": [floats(2, 100)],                # tiny trains for 2 epochs
    "num_train_steps": [st.just(0)],
}


def tiny_config(npz: str) -> ml_collections.ConfigDict:
  """configs/tiny.py on the test .npz, without type checks at any level (tests assign any
  value; a type-safe ConfigDict would turn False into 0.0 in a float field, for one)."""

  def unsafe(tree):
    return ml_collections.ConfigDict(
        {k: unsafe(v) if isinstance(v, dict) else v for k, v in tree.items()}, type_safe=False)

  return unsafe(tiny_run.config(npz).to_dict())


def assign(config, field: str, value) -> None:
  group, _, name = field.rpartition(".")
  (config[group] if group else config)[name] = value


def validate(config) -> None:
  cv.validate(config, num_devices=NUM_DEVICES)
  cv.validate_against_data(config, N)


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  return tiny_run.write_npz(tmp_path_factory.mktemp("data") / "tiny.npz", n=N)


def sized_npz(npz: str, size: int) -> str:
  """The test .npz (16 x 16 images) or a copy of the same shape at another image size."""
  if size == 16:
    return npz
  path = f"{npz[:-len('.npz')]}_{size}.npz"
  if not os.path.exists(path):
    tiny_run.write_npz(path, n=N, shape=(size, size, 1))
  return path


# -- properties ----------------------------------------------------------------------------------


def test_every_field_has_a_rule_and_valid_values():
  schema = default_config.get_config()
  leaves = {f"{k}.{sub}" if isinstance(v, ml_collections.ConfigDict) else k
            for k, v in schema.items()
            for sub in (v.keys() if isinstance(v, ml_collections.ConfigDict) else [None])}
  assert set(FIELDS) == leaves
  assert set(VALID) | set(DATA_FIELDS) == leaves


def test_every_default_config_field_has_a_doc_and_a_rule_its_default_passes():
  config = default_config.get_config()
  for name, declared in FIELDS.items():
    assert declared.doc and "\n" not in declared.doc, name
    assert callable(declared.rule), name
    default = cf.get_field(config, name)
    assert default == declared.default and type(default) is type(declared.default), name
    declared.rule(name, default)


def test_a_field_is_refused_without_a_doc_or_with_a_default_its_rule_refuses():
  with pytest.raises(ValueError, match="one non-empty line"):
    cf.field(1, cf.Integer(0), "")
  with pytest.raises(ValueError, match="default must pass its rule .*must be >= 0"):
    cf.field(-1, cf.Integer(0), "A count.")


def test_step_config_takes_the_schema_fields_tagged_step():
  derived = {"layout", "augment", "num_classes"}      # from the data, not the config
  attrs = {f.name for f in dataclasses.fields(steps.StepConfig)}
  assert set(config_schema.STEP_FIELDS) == attrs - derived
  assert set(config_schema.STEP_FIELDS.values()) <= set(FIELDS)
  assert config_schema.STEP_FIELDS["global_batch"] == "batch_size"
  config = default_config.get_config()
  layout = ShardLayout(100, 4)
  hp = steps.StepConfig.from_config(config, layout, augment_config=None, num_classes=10)
  for attr, name in config_schema.STEP_FIELDS.items():
    assert getattr(hp, attr) == cf.get_field(config, name), attr
  assert (hp.layout, hp.augment, hp.num_classes) == (layout, None, 10)


def test_run_identity_is_the_schema_fields_tagged_identity_and_unchanged():
  assert set(config_schema.IDENTITY_FIELDS) <= set(FIELDS)
  meta = config_io.run_meta(default_config.get_config(), ShardLayout(100, 4), "sha:x")
  # The identity checkpoints are written with: changing it stops existing workdirs resuming.
  assert meta == {
      "num_instances": 100, "num_devices": 4, "low_dim": 128, "model": "cifar_resnet18",
      "model_width": 0, "head_batchnorm": False, "objective": "nce", "bank_dtype": "float32",
      "image_size": 32, "dataset": "cifar10", "dataset_fingerprint": "sha:x"}


def test_did_you_mean_is_written_once():
  package = os.path.join(tiny_run.REPO, "instdisc_jax")
  users = [os.path.relpath(os.path.join(root, name), package)
           for root, _, names in os.walk(package) for name in names if name.endswith(".py")
           and "difflib" in open(os.path.join(root, name), encoding="utf-8").read()]
  assert users == ["config_fields.py"]
  assert cf.suggest("Flips", ("flip", "hue"), prefix="augment.") == (
      "; did you mean 'augment.flip'?")
  assert cf.suggest("zzz", ("flip", "hue")) == ""


@pytest.mark.parametrize("path", sorted(os.listdir(CONFIGS)))
def test_shipped_configs_are_valid(path):
  cv.validate(default_config.load_config_file(os.path.join(CONFIGS, path)),
              num_devices=NUM_DEVICES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_invalid_field_is_rejected_in_one_line_naming_it(npz, data):
  field = data.draw(st.sampled_from(sorted(FIELDS)), label="field")
  value = data.draw(invalid_values(field), label="value")
  config = tiny_config(npz)
  assign(config, field, value)
  # ConfigDict itself turns a bool into a number in a float field; validation never sees it.
  assume(type(cf.get_field(config, field)) is type(value))
  with pytest.raises(ConfigError) as error:
    validate(config)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"config.{field}=")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.from_regex(r"[a-z][a-z_]{0,14}", fullmatch=True), nested=st.booleans())
def test_unknown_field_is_rejected_in_one_line_naming_it(npz, name, nested):
  config = tiny_config(npz)
  group = config.augment if nested else config
  if name in group:
    return
  group[name] = 1
  with pytest.raises(ConfigError) as error:
    validate(config)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"config.{'augment.' if nested else ''}{name} is not a config field")


@pytest.mark.parametrize("typo, meant", [("batchsize", "batch_size"), ("temprature", "temperature"),
                                         ("num_negative", "num_negatives"), ("lowdim", "low_dim")])
def test_unknown_field_suggests_the_closest(npz, typo, meant):
  config = tiny_config(npz)
  config[typo] = 1
  with pytest.raises(ConfigError, match=f"^config.{typo} is not a config field; did you mean "
                                        f"'{meant}'\\?$"):
    validate(config)


@pytest.mark.parametrize("field, value, message", [
    ("num_negatives", 64, "config.num_negatives=64: must be less than the number of training "
     "images n=64"),
    ("num_negatives", 0, "config.num_negatives=0: must be >= 1"),
    ("knn_k", 65, "config.knn_k=65: must be at most the number of training images n=64"),
    ("temperature", 0.0, "config.temperature=0.0: must be > 0"),
    ("momentum", 1.0, "config.momentum=1.0: must be < 1"),
    ("batch_size", 20, "config.batch_size=20: must be divisible by the number of devices (8), "
     "e.g. 16"),
    ("model", "resnet5", "config.model='resnet5': must be one of cifar_resnet18, resnet18, "
     "resnet50, small_resnet; did you mean 'resnet50'?"),
    ("objective", "NCE", "config.objective='NCE': must be one of nce, softmax, "
     "parametric_softmax, infonce, supervised; did you mean 'nce'?"),
    ("dataset", "cifar-10", "config.dataset='cifar-10': must be one of fashion_mnist, mnist, "
     "cifar10, cifar100, stl10, imagenet2012, or folder:/path or npz:/path/file.npz; did you "
     "mean 'cifar10'?"),
])
def test_messages_name_the_field_the_value_and_the_fix(npz, field, value, message):
  config = tiny_config(npz)
  assign(config, field, value)
  with pytest.raises(ConfigError) as error:
    validate(config)
  assert str(error.value) == message


_traced = {}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(data=st.data())
def test_valid_config_passes_and_builds_a_train_step(npz, tmp_path_factory, data):
  fields = data.draw(st.lists(st.sampled_from(sorted(VALID)), max_size=3, unique=True),
                     label="fields")
  config = tiny_config(npz)
  for field in fields:
    assign(config, field, data.draw(VALID[field], label=field))
  # Images stored at a fixed size must be image_size x image_size (tests/test_bad_inputs.py checks
  # the refusal): the drawn size gets its own copy of the data.
  config.dataset = "npz:" + sized_npz(npz, config.image_size)
  validate(config)
  key = tuple(cf.get_field(config, field) for field in STEP_SHAPING)
  if key not in _traced:
    _traced[key] = trace_train_step(config, str(tmp_path_factory.mktemp("unused")))
  metrics = _traced[key]
  assert metrics["loss"] == jax.ShapeDtypeStruct((NUM_DEVICES,), jnp.float32)


@pytest.mark.parametrize("objective", FIELDS["objective"].rule.choices)
def test_every_objective_builds_a_train_step(npz, tmp_path_factory, objective):
  """Each objective, not only those the draw above happens to reach, traces on 8 devices with the
  batch the loop feeds it."""
  config = tiny_config(npz)
  config.objective = objective
  validate(config)
  metrics = trace_train_step(config, str(tmp_path_factory.mktemp("unused")))
  assert metrics["loss"] == jax.ShapeDtypeStruct((NUM_DEVICES,), jnp.float32)


def trace_train_step(config, workdir):
  """The metrics' shapes of one train step of `config` on 8 devices, traced, not compiled."""
  trainer = train.Trainer(config, workdir)
  key = jax.random.key_data(jax.random.key(0))
  state = jax.eval_shape(trainer.p_init, jax.ShapeDtypeStruct((NUM_DEVICES,) + key.shape,
                                                              key.dtype))
  local = config.batch_size // NUM_DEVICES
  batch = {"image": jax.ShapeDtypeStruct((NUM_DEVICES, local) + trainer.image_shape, jnp.uint8),
           "index": jax.ShapeDtypeStruct((NUM_DEVICES, local), jnp.int32)}
  if trainer.hp.uses_labels:                         # the loop feeds labels to these objectives
    batch["label"] = jax.ShapeDtypeStruct((NUM_DEVICES, local), jnp.int32)
  _, metrics = jax.eval_shape(trainer.p_train_step, state, batch)
  assert os.listdir(workdir) == []                  # building a Trainer writes nothing
  return metrics
