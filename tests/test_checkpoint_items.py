"""Checkpoint items of zero-size arrays only (a model without MoE layers: [0, E] router state)."""
import jax
import jax.numpy as jnp
import numpy as np

from moejax import checkpoint


def test_state_with_an_empty_item_saves_and_restores(tmp_path):
  state = {'params': {'w': jnp.arange(6.0).reshape(2, 3)}, 'router_bias': jnp.zeros((0, 4)),
           'step': jnp.asarray(3, jnp.int32)}
  mngr = checkpoint.manager(str(tmp_path), max_to_keep=1, async_save=False)
  checkpoint.save(mngr, 3, state, {'iterator': None})
  mngr.wait_until_finished()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
  restored, data = checkpoint.restore(mngr, abstract)
  assert set(restored) == set(state) and data == {'iterator': None}
  np.testing.assert_array_equal(restored['params']['w'], state['params']['w'])
  assert restored['router_bias'].shape == (0, 4) and int(restored['step']) == 3
  assert set(checkpoint.saved_items(state)) == {'params', 'step'}
