"""FLOPs of TensorFlow ops counted from shapes (no TensorFlow needed)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from modelparallel.tracer.tf_flops import MOVEMENT_OPS, op_flops


@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 64))
def test_matmul_and_einsum_agree(m: int, k: int, n: int) -> None:
    mm = op_flops("MatMul", [(m, k), (k, n)], [(m, n)])
    es = op_flops("Einsum", [(m, k), (k, n)], [(m, n)], equation="mk,kn->mn")
    assert mm == es == 2 * m * k * n


@given(st.integers(1, 8), st.integers(1, 16), st.integers(1, 16), st.integers(1, 16))
def test_batch_matmul_counts_every_batch(b: int, m: int, k: int, n: int) -> None:
    assert op_flops("BatchMatMulV2", [(b, m, k), (b, k, n)], [(b, m, n)]) == 2 * b * m * k * n
    assert op_flops("BatchMatMulV2", [(b, k, m), (b, k, n)], [(b, m, n)], adj_x=True) == (
        2 * b * m * k * n)


def test_conv_pool_softmax_and_movement() -> None:
    # 3x3 conv, 4 -> 8 channels, on a 2x5x5 output: 2 * out * 3 * 3 * 4
    assert op_flops("Conv2D", [(2, 5, 5, 4), (3, 3, 4, 8)], [(2, 5, 5, 8)]) == 2 * 400 * 36
    assert op_flops("Softmax", [(2, 10)], [(2, 10)]) == 100
    assert op_flops("Sum", [(4, 6)], [(4,)]) == 24
    assert all(op_flops(t, [(3, 3)], [(3, 3)]) == 0 for t in MOVEMENT_OPS)
