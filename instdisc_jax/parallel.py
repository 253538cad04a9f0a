"""Placing values on the devices of a (possibly multi-process) `jax.pmap` run.

Every array the pmapped step sees has a leading device axis of global size D (all devices of all
processes, in `jax.devices()` order), sharded one slice per device: `NamedSharding(mesh,
P(AXIS))`. Replicated values (params, optimizer state, Z) hold one identical slice per device;
instance-sharded values (the bank) hold one shard per device. A process only ever touches the
slices of its local devices.

pmap takes such global arrays, and global position k on the device axis is `lax.axis_index` k
inside the step. With several processes, pmap *returns* host-local arrays: shape (L, ...) over
this process's L devices, slice j being global position `local_device_indices()[j]`. They can be
passed back to pmap as they are; `to_global` turns them into the global (D, ...) array that they
are this process's part of (which is what checkpoints store).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXIS = "devices"

# `devices` arguments below: the devices of the mapped axis, in axis order (as passed to
# `jax.pmap(devices=...)`); None means all devices of all processes. Runs always use None; a
# subset lets one process compare a computation on D devices with the same on fewer.
Devices = Optional[Sequence[jax.Device]]


def mesh(devices: Devices = None) -> Mesh:
  """1-D mesh over `devices` (all devices of all processes, in global device order)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,))


def device_sharding(devices: Devices = None) -> NamedSharding:
  """One slice of the leading axis per device."""
  return NamedSharding(mesh(devices), P(AXIS))


def replicated_sharding(devices: Devices = None) -> NamedSharding:
  """The whole array on every device."""
  return NamedSharding(mesh(devices), P())


def local_device_indices(devices: Devices = None) -> np.ndarray:
  """Positions (on the device axis) of this process's devices."""
  devices = jax.devices() if devices is None else devices
  local = set(jax.local_devices())
  return np.asarray([i for i, d in enumerate(devices) if d in local])


def _stack_on_devices(x, devices: Devices = None) -> jax.Array:
  """A host/replicated value -> (D, ...) array with the same value in every device's slice."""
  x = np.asarray(x)
  sharding = device_sharding(devices)
  slices = [jax.device_put(x[None], d) for d in sharding.addressable_devices]
  return jax.make_array_from_single_device_arrays((sharding.mesh.size,) + x.shape, sharding,
                                                  slices)


def replicate(tree: Any, devices: Devices = None) -> Any:
  """Host pytree -> the same pytree with a leading device axis (one copy per device)."""
  return jax.tree.map(lambda x: _stack_on_devices(x, devices), tree)


def shard_local_batch(tree: Any) -> Any:
  """This process's slice of the global batch, (b, ...) numpy -> global (D, b / L, ...) array.

  The process's b examples are split evenly over its L local devices, in device order.
  """
  local = jax.local_device_count()

  def put(x):
    x = np.asarray(x)
    if x.shape[0] % local:
      raise ValueError(f"a process batch of {x.shape[0]} does not split over {local} devices")
    return jax.make_array_from_process_local_data(
        device_sharding(), x.reshape((local, x.shape[0] // local) + x.shape[1:]))

  return jax.tree.map(put, tree)


def shard_local_rows(tree: Any, devices: Devices = None) -> Any:
  """This process's (L, ...) host slices of an instance-sharded value -> global (D, ...) array."""
  sharding = device_sharding(devices)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_global(x: jax.Array) -> jax.Array:
  """A pmap output (D or L slices on the device axis) -> the global (D, ...) array."""
  if x.shape[0] == jax.device_count():
    return x
  return jax.make_array_from_single_device_arrays(
      (jax.device_count(),) + x.shape[1:], device_sharding(),
      [s.data for s in x.addressable_shards])


def join_collectives() -> None:
  """Runs one all-device psum, so that all processes set up their collectives together.

  Call it right after `jax.distributed.initialize` (a no-op with one process). The first
  collective over a set of devices is where the processes connect to each other, and on CPU
  (gloo) they must all get there within 30 s. Were that the first train step, a process that
  compiles it much faster than another (e.g. from the persistent compilation cache, which in a
  multi-process run only process 0 writes) would fail with "Gloo context initialization failed".
  Once connected, a collective waits for slower processes as long as it takes.
  """
  if jax.process_count() == 1:
    return
  ones = shard_local_rows(np.ones((jax.local_device_count(),), np.int32))
  jax.block_until_ready(jax.pmap(lambda x: jax.lax.psum(x, AXIS), axis_name=AXIS)(ones))


def first_replica(x: jax.Array) -> np.ndarray:
  """Host copy of a replicated (D, ...) value, read from this process's first device."""
  return np.asarray(x.addressable_shards[0].data)[0]    # Indexing on the host compiles nothing.


def to_single_copy(x: jax.Array) -> jax.Array:
  """Replicated (D, ...) -> (...) with a replicated sharding, without copying data.

  Used to checkpoint replicated values once rather than D times.
  """
  return jax.make_array_from_single_device_arrays(
      x.shape[1:], replicated_sharding(),
      [s.data.reshape(x.shape[1:]) for s in x.addressable_shards])


def from_single_copy(x: jax.Array) -> jax.Array:
  """Inverse of `to_single_copy`: replicated (...) -> (D, ...) one slice per device."""
  return jax.make_array_from_single_device_arrays(
      (jax.device_count(),) + x.shape, device_sharding(),
      [s.data[None] for s in x.addressable_shards])


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process; every process must call this at the same point."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
