"""PBS attention on a CUDA GPU: Triton kernels in bf16/fp16/fp32 against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from attention_checks import assert_low_precision_errors, random_qkv, relative_errors
from kernels import pbs_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3),
                                       (torch.float32, 1e-4)])
@pytest.mark.parametrize("shape", [(1, 8, 8, 1000, 64), (2, 8, 2, 2125, 128),
                                   (1, 8, 1, 1536, 128), (1, 4, 1, 777, 64)],
                         ids=lambda s: "B{}-Hq{}-Hkv{}-N{}-D{}".format(*s))
def test_gpu_kernels_match_float64_reference(shape, dtype, tol):
    q, k, v = random_qkv(*shape, dtype=dtype, device="cuda", outliers=True)
    plan, errors = relative_errors(q, k, v, threshold=0.8, block_size=128, segment_size=256)
    assert_low_precision_errors(errors, tol)


def test_gpu_block_64_and_no_permutation():
    q, k, v = random_qkv(1, 4, 2, 1300, 128, dtype=torch.bfloat16, device="cuda", outliers=True)
    _, errors = relative_errors(q, k, v, threshold=0.7, block_size=64, segment_size=128,
                                permute=False)
    assert_low_precision_errors(errors, 2e-2)


def test_gpu_threshold_one_matches_dense_sdpa_at_16k():
    q, k, v = random_qkv(1, 4, 2, 16384, 128, dtype=torch.bfloat16, device="cuda")
    out = pbs_attention(q, k, v, threshold=1.0)
    out.backward(torch.ones_like(out))
    qd, kd, vd = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd.repeat_interleave(2, 1),
                                         vd.repeat_interleave(2, 1), is_causal=True)
    ref.backward(torch.ones_like(ref))
    for got, want in ((out, ref), (q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert torch.isfinite(got).all()
        assert ((got.float() - want).norm() / want.norm()).item() < 2e-2
