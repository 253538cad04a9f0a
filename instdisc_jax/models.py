"""Flax Linen encoders: backbone, global average pool, linear head to `low_dim`, L2 norm.

Variants (all built from `ResNet`):

* `CifarResNet18`: the reference's `models/resnet_cifar.py` (3x3 stride-1 stem, no max-pool).
* `ResNet18`, `ResNet50`: torchvision layout (7x7/2 stem, 3x3/2 max-pool), v1.5 bottleneck
  (the stride sits on the 3x3 conv).
* `SmallResNet`: a narrow ResNet for 28x28 inputs that trains in minutes on a CPU: a 3x3/2 stem
  (28 -> 14), then stages at 14x14, 7x7 and 4x4; `width` and `stage_sizes` are its size knobs.

Every encoder maps images (B, H, W, C) to float32 unit-norm embeddings (B, low_dim); with
`return_pooled=True` it also returns the float32 pooled backbone features (B, D) that the linear
probe trains on. Convolutions and BatchNorm run in `dtype`; parameters are float32.

BatchNorm statistics are per device by default (as the reference's `DataParallel`); set
`bn_axis_name` to the mapped axis name to average them over devices instead.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from instdisc_jax import memory_bank
from instdisc_jax.config_fields import suggest
from instdisc_jax.errors import ConfigError

ModuleDef = Any

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the bias starts at
# zero (torch draws it like the weight).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BasicBlock(nn.Module):
  """torchvision `BasicBlock`: two 3x3 convs; 1x1 conv + BN shortcut when the shape changes."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=_last_bn_scale_init(self.zero_init_residual))(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class Bottleneck(nn.Module):
  """torchvision v1.5 `Bottleneck`: 1x1, 3x3 (strided), 1x1 expanding by 4."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = False
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = self.conv(self.filters, (1, 1))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), self.strides)(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * self.expansion, (1, 1))(y)
    y = self.norm(scale_init=_last_bn_scale_init(self.zero_init_residual))(y)
    if residual.shape != y.shape:
      residual = self.conv(
          self.filters * self.expansion, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


def _last_bn_scale_init(zero_init_residual: bool) -> Callable[..., jax.Array]:
  return nn.initializers.zeros if zero_init_residual else nn.initializers.ones


def _conv(
    features: int, kernel_size: Sequence[int], strides: int = 1, **kwargs: Any
) -> nn.Conv:
  """Bias-free conv with PyTorch's symmetric `kernel_size // 2` padding.

  Flax's "SAME" pads (0, 1) for a stride-2 3x3 conv on even inputs where PyTorch pads (1, 1);
  explicit padding keeps the sampling grid of the reference models.
  """
  return nn.Conv(
      features, tuple(kernel_size), strides=(strides, strides),
      padding=[(k // 2, k // 2) for k in kernel_size], use_bias=False,
      kernel_init=conv_kernel_init, **kwargs)


class ResNet(nn.Module):
  """ResNet encoder ending in a linear head to `low_dim` and L2 normalisation.

  Attributes:
    stage_sizes: blocks per stage; stage i has width `width * 2**i` (times the block's
      expansion) and stride 2 in its first block for i > 0.
    block_cls: `BasicBlock` or `Bottleneck`.
    stem: "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), "cifar" (3x3/1 conv, BN, ReLU) or
      "small" (3x3/2 conv, BN, ReLU).
    width: channels of the stem and of the first stage.
    low_dim: embedding dimension.
    dtype: compute dtype of the backbone; parameters, the head and the outputs are float32.
    bn_axis_name: mapped axis to average BatchNorm statistics over; None for per-device BN.
    zero_init_residual: zero-init the last BN scale of every block (torchvision's flag).
    head_batchnorm: BatchNorm (affine) on the head's output before the L2 normalisation. Not in
      the reference; it centres the embeddings, which speeds up the early epochs of short runs.
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  stem: str = "imagenet"
  width: int = 64
  low_dim: int = 128
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  zero_init_residual: bool = False
  head_batchnorm: bool = False

  @nn.compact
  def __call__(
      self, x: jax.Array, train: bool = True, return_pooled: bool = False
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Embeds images (B, H, W, C); returns embeddings, or `(embeddings, pooled)`."""
    conv = functools.partial(_conv, dtype=self.dtype)
    # PyTorch BatchNorm2d defaults: momentum 0.1 (Flax counts the other way), eps 1e-5.
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
        dtype=self.dtype, axis_name=self.bn_axis_name)

    x = jnp.asarray(x, self.dtype)
    if self.stem == "imagenet":
      x = conv(self.width, (7, 7), 2, name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem in ("cifar", "small"):
      x = conv(self.width, (3, 3), 2 if self.stem == "small" else 1, name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
    else:
      raise ValueError(f"stem must be 'imagenet', 'cifar' or 'small', got {self.stem!r}")

    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = self.block_cls(
            self.width * 2**i, conv=conv, norm=norm, strides=2 if i > 0 and j == 0 else 1,
            zero_init_residual=self.zero_init_residual)(x)

    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    embedding = nn.Dense(self.low_dim, kernel_init=dense_kernel_init, name="head")(pooled)
    if self.head_batchnorm:
      embedding = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                               axis_name=self.bn_axis_name, name="head_bn")(embedding)
    embedding = memory_bank.l2_normalize(embedding)
    return (embedding, pooled) if return_pooled else embedding


CifarResNet18 = functools.partial(
    ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, stem="cifar")
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
# On CPUs convolutions at 28x28 cost far more per FLOP than at 14x14 and below, hence the
# strided stem.
SmallResNet = functools.partial(
    ResNet, stage_sizes=(1, 1, 1), block_cls=BasicBlock, stem="small", width=16)

MODELS: dict[str, Callable[..., ResNet]] = {
    "cifar_resnet18": CifarResNet18,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "small_resnet": SmallResNet,
}


def get_model(name: str, **kwargs: Any) -> ResNet:
  """Builds the encoder registered as `name` (see `MODELS`); `kwargs` set `ResNet` fields."""
  if name not in MODELS:
    valid = ", ".join(sorted(MODELS))
    raise ConfigError(f"model: unknown model {name!r}, valid names are {valid}"
                      f"{suggest(name, MODELS)}")
  # Config lists (e.g. stage_sizes) become tuples so the module stays hashable.
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return MODELS[name](**kwargs)
