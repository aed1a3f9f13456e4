"""Small building blocks shared by the project's Flax models."""

import math

import jax


def matmul_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`jax.lax.dot_general` that runs a dense layer as one 2-D matrix product.

  A Flax `Dense`/`DenseGeneral` on `[B, L, D]` activations contracts the trailing input axes with the leading
  kernel axes. XLA:CPU computes the weight gradient of such a dot (a contraction over B and L) about 2x slower
  than the same product on `[B*L, D]` (measured on the demo teacher: a 4-layer, 128-wide step at batch 64 went from
  482 to 420 ms on a 2-core CPU). Flattening the leading axes is free on GPU and TPU, so every dense layer of the
  transformers passes this as `dot_general=`; any other contraction falls through to `jax.lax.dot_general`.
  Same parameters, same math (only the float summation order may differ).
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_contract, rhs_contract = tuple(lhs_contract), tuple(rhs_contract)
  num_lead = lhs.ndim - len(lhs_contract)
  trailing = lhs_contract == tuple(range(num_lead, lhs.ndim))
  leading = rhs_contract == tuple(range(len(rhs_contract)))
  if lhs_batch or rhs_batch or not trailing or not leading or num_lead < 2:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  k = math.prod(lhs.shape[num_lead:])
  out = jax.lax.dot_general(lhs.reshape(-1, k), rhs.reshape(k, -1), (((1,), (0,)), ((), ())),
                            precision=precision, preferred_element_type=preferred_element_type, **kwargs)
  return out.reshape(*lhs.shape[:num_lead], *rhs.shape[len(rhs_contract):])
