"""The baselines of the seeds table: the supervised objective against its NumPy formula (1 and 8
devices), raw-pixel kNN against the brute-force reference, the pixel logistic regression and
the random-initialisation evaluator without a Trainer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref

from instdisc_jax import objectives
from instdisc_jax import sharding
from instdisc_jax.evaluation import baselines

TAU = 0.1
BATCH = 16
DIM = 8
CLASSES = 5
AXIS = "devices"


def supervised_formula(features, labels, classifier, temperature, xp=np):
  """-mean over labelled i of log softmax(f_i W / tau)[y_i]."""
  keep = labels >= 0
  logits = features[keep] @ classifier / temperature
  return ref.softmax_xent(logits, labels[keep], xp)


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  features = ref.normalize(rng.normal(size=(BATCH, DIM)))
  labels = rng.integers(0, CLASSES, size=BATCH)
  labels[[3, 11]] = -1                               # unknown labels are left out
  classifier = rng.normal(size=(DIM, CLASSES))
  return features, labels, classifier


def supervised_value_and_grads(features, labels, classifier, num_shards):
  """Loss and (feature, classifier) gradients as the train step computes them: unsharded, or on
  `num_shards` devices with the batch split, all-gathered, and W's gradient psummed."""
  def share(f, w, y, axis_name):
    return objectives.supervised_loss(f, y, w, temperature=TAU, axis_name=axis_name)[0]

  f, y, w = (jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.int32),
             jnp.asarray(classifier, jnp.float32))
  if num_shards is None:
    value, (f_grad, w_grad) = jax.value_and_grad(share, argnums=(0, 1))(f, w, y, None)
    return value, f_grad, w_grad

  def body(f_local, w, y_local):
    def loss(f_local, w):
      return share(sharding.gather_batch(f_local, AXIS), w,
                   sharding.gather_batch(y_local, AXIS), AXIS)
    value, (f_grad, w_grad) = jax.value_and_grad(loss, argnums=(0, 1))(f_local, w)
    return jax.lax.psum(value, AXIS), f_grad, jax.lax.psum(w_grad, AXIS)

  local = lambda x: x.reshape((num_shards, BATCH // num_shards) + x.shape[1:])
  value, f_grad, w_grad = jax.pmap(body, axis_name=AXIS)(
      local(f), jnp.broadcast_to(w, (num_shards,) + w.shape), local(y))
  return value[0], f_grad.reshape(BATCH, DIM), w_grad[0]


@pytest.mark.parametrize("num_shards", [None, 8])
def test_supervised_loss_matches_formula(data, num_shards):
  features, labels, classifier = data
  value, f_grad, w_grad = supervised_value_and_grads(features, labels, classifier, num_shards)
  np.testing.assert_allclose(value, supervised_formula(features, labels, classifier, TAU),
                             rtol=1e-5)
  numeric_f = ref.numerical_grad(lambda f: supervised_formula(f, labels, classifier, TAU),
                                 features)
  numeric_w = ref.numerical_grad(lambda w: supervised_formula(features, labels, w, TAU),
                                 classifier)
  np.testing.assert_allclose(f_grad, numeric_f, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(w_grad, numeric_w, rtol=1e-4, atol=1e-5)


def test_supervised_metrics_are_the_batch_accuracy(data):
  features, labels, classifier = data
  _, aux = objectives.supervised_loss(jnp.asarray(features, jnp.float32), jnp.asarray(labels),
                                      jnp.asarray(classifier, jnp.float32), temperature=TAU)
  keep = labels >= 0
  predicted = np.argmax(features @ classifier, axis=1)
  np.testing.assert_allclose(aux["metrics"]["train_top1"],
                             100.0 * np.mean(predicted[keep] == labels[keep]), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Raw pixels and random initialisation.
# ------------------------------------------------------------------------------------------------


def test_raw_pixel_knn_equals_numpy_reference():
  rng = np.random.default_rng(1)
  train_images = rng.integers(0, 256, size=(61, 6, 6, 1), dtype=np.uint8)   # 61 % 8 != 0
  test_images = rng.integers(0, 256, size=(23, 6, 6, 1), dtype=np.uint8)
  train_labels = rng.integers(0, CLASSES, size=61).astype(np.int32)
  test_labels = rng.integers(0, CLASSES, size=23).astype(np.int32)
  got = baselines.raw_pixels(train_images, train_labels, test_images, test_labels,
                             num_classes=CLASSES, k=7, temperature=0.07)
  train_x = ref.normalize(train_images.reshape(61, -1).astype(np.float64))
  test_x = ref.normalize(test_images.reshape(23, -1).astype(np.float64))
  scores, _ = ref.knn(test_x, train_x, train_labels, 7, 0.07, CLASSES)
  ranked = np.argsort(-scores, axis=1, kind="stable")
  assert got["knn"]["top1"] == pytest.approx(100.0 * np.mean(ranked[:, 0] == test_labels))
  assert got["knn"]["top5"] == pytest.approx(
      100.0 * np.mean(np.any(ranked[:, :5] == test_labels[:, None], axis=1)))
  assert "linear_probe" not in got


def _separable(rng, n, size=4):
  """Images whose class (0-3) sets which quadrant is bright, with noise elsewhere."""
  labels = rng.integers(0, 4, size=n).astype(np.int32)
  images = rng.integers(0, 60, size=(n, size, size, 1)).astype(np.uint8)
  half = size // 2
  for i, label in enumerate(labels):
    r, c = divmod(int(label), 2)
    images[i, r * half:(r + 1) * half, c * half:(c + 1) * half] += 180
  return images, labels


def _probe_config():
  from instdisc_jax.evaluation import linear_probe
  return linear_probe.ProbeConfig(epochs=20, batch_size=32, learning_rate=0.05,
                                  weight_decay=0.0, seed=0)


def test_pixel_logistic_regression_learns_a_separable_problem():
  rng = np.random.default_rng(2)
  train_images, train_labels = _separable(rng, 200)
  test_images, test_labels = _separable(rng, 64)
  got = baselines.raw_pixels(train_images, train_labels, test_images, test_labels,
                             num_classes=4, k=5, temperature=0.1,
                             probe_config=_probe_config())
  assert got["linear_probe"]["top1"] == 100.0
  assert got["linear_probe"]["train_top1"] == 100.0
  assert got["knn"]["top1"] == 100.0


@pytest.mark.slow
def test_random_init_evaluator_runs_without_a_trainer():
  """The encoder's initial state, embedded by `steps.embed` under pmap: no Trainer, no data."""
  import ml_collections

  from instdisc_jax import augment
  from instdisc_jax import models
  from instdisc_jax import optim
  from instdisc_jax import parallel
  from instdisc_jax import steps
  from instdisc_jax.sharding import ShardLayout

  rng = np.random.default_rng(3)
  train_images, train_labels = _separable(rng, 48, size=8)
  test_images, test_labels = _separable(rng, 16, size=8)
  model = models.get_model("small_resnet", low_dim=8, width=4)
  config = ml_collections.ConfigDict(dict(
      objective="nce", temperature=0.07, num_negatives=4, shared_noise=False, z_mode="frozen",
      z_momentum=0.99, bank_momentum=0.5, proximal_weight=0.0, batch_size=16, knn_k=5,
      knn_temperature=0.1, weight_decay=0.0, momentum=0.9, nesterov=False))
  augment_config = augment.AugmentConfig(image_size=8, mean=(0.5,), std=(0.25,))
  hp = steps.StepConfig.from_config(config, ShardLayout(48, jax.device_count()), augment_config,
                                    num_classes=4)
  tx = optim.sgd(config, lambda step: 0.0)
  state = steps.pmapped(steps.init_state, model=model, tx=tx, hp=hp, image_shape=(8, 8, 1),
                        low_dim=8, bank_init="uniform", bank_dtype=jnp.float32)(
                            parallel.replicate(jax.random.key_data(jax.random.key(0))))
  evaluator = baselines.FeatureBaseline(
      baselines.state_embed_fn(state, model=model, hp=hp), num_classes=4, k=5,
      temperature=0.1, probe_config=_probe_config(), batch_size=16)
  got = evaluator.run(train_images, train_labels, test_images, test_labels)
  assert 0.0 <= got["knn"]["top1"] <= 100.0
  assert set(got["linear_probe"]) == {"embedding", "pooled"}
  for result in got["linear_probe"].values():
    assert 0.0 <= result["top1"] <= 100.0


def test_supervised_on_an_unlabelled_split_is_refused(tmp_path):
  """One line naming the field and the fix, before anything is compiled or written."""
  import tiny_run

  from instdisc_jax import train
  from instdisc_jax.errors import UserError

  path = tmp_path / "unlabelled.npz"
  np.savez(path, images=np.zeros((64, 16, 16, 1), np.uint8))
  config = tiny_run.config(str(path), objective="supervised")
  with pytest.raises(UserError, match="config.objective=supervised, but .* has no labels"):
    train.Trainer(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_supervised_objective_trains_the_classifier(tmp_path):
  """A few steps of the tiny run with labels: the classifier exists, is replicated and moves."""
  import tiny_run

  from instdisc_jax import train

  npz = tiny_run.write_blobs_npz(tmp_path / "blobs.npz")
  config = tiny_run.config(npz, objective="supervised", num_train_steps=4,
                           recompute_features=False)
  results = train.train_and_evaluate(config, str(tmp_path / "w"))
  assert results["step"] == 4
  with open(tmp_path / "w" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert any("train_top1" in record for record in records)
