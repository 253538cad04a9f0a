"""ShardLayout bookkeeping."""

import numpy as np
import pytest

from instdisc_jax.sharding import ShardLayout


@pytest.mark.parametrize("n,d", [(61, 8), (64, 8), (9, 8), (1, 1), (5, 8)])
def test_layout_covers_every_instance_once(n, d):
  layout = ShardLayout(n, d)
  assert layout.real_rows().sum() == n
  assert layout.padded_size >= n and layout.padded_size - n < d * 1 + layout.rows_per_shard
  owners = layout.owner(np.arange(n))
  assert np.all(np.bincount(owners, minlength=d) == layout.real_rows())


def test_shard_array_round_trip_and_padding():
  layout = ShardLayout(10, 4)
  full = np.arange(20).reshape(10, 2)
  sharded = layout.shard_array(full, fill=-1)
  assert sharded.shape == (4, 3, 2)
  assert (sharded[3, 1:] == -1).all()
  np.testing.assert_array_equal(layout.unshard_array(sharded), full)
  with pytest.raises(ValueError):
    layout.shard_array(full[:9])


def test_invalid_layouts():
  with pytest.raises(ValueError):
    ShardLayout(0, 1)
  with pytest.raises(ValueError):
    ShardLayout(5, 0)
