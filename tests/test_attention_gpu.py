"""PBS attention on a CUDA GPU: Triton kernels in bf16/fp16/fp32 against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from attention_checks import assert_low_precision_errors, random_qkv, relative_errors
from kernels import pbs_attention, reference_attention
from test_documents import random_pack

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


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3),
                                       (torch.float32, 1e-4)])
@pytest.mark.parametrize("b,S,kwargs", [(128, 256, {"threshold": 0.8}),
                                        (64, 128, {"density": 0.2})])
def test_gpu_packed_documents_equal_each_document_alone(dtype, tol, b, S, kwargs):
    """Packed rows (2-5 documents, a row with an uncovered tail, GQA) on the GPU: each
    document's rows and gradients equal pbs_attention on it alone (the same plan), both match
    the float64 reference of their plan, rows outside documents give exactly 0.

    The importance pass splits its keys into chunks sized from N and B in the pack and from the
    document's length alone (as it does between batch sizes without documents), so importances
    may differ in the last bits: keys get well-separated importances (logit offsets spread over
    4 along a shared direction) so that no near-tie decides the permutation."""
    B, Hq, Hkv, N, D = 2, 8, 2, 4096, 128
    gen = torch.Generator().manual_seed(b)
    starts, ends, rows = random_pack(gen, B, N, b, S, tail_gap=(False, True),
                                     max_blocks=N // b // 2)
    q, k, v = (torch.randn(B, h, N, D, generator=gen) for h in (Hq, Hkv, Hkv))
    direction = torch.randn(D, generator=gen)
    direction /= direction.norm()
    offsets = torch.rand(B, Hkv, N, generator=gen).argsort(-1).float() / N * 4  # distinct
    q = 0.3 * q + D ** 0.5 * direction
    k = 0.3 * k + offsets[..., None] * direction
    q, k, v = (x.to("cuda", dtype).requires_grad_() for x in (q, k, v))
    out, plan = pbs_attention(q, k, v, b, S, doc_starts=starts.cuda(), query_end=ends.cuda(),
                              return_plan=True, **kwargs)
    dout = torch.randn(out.shape, generator=gen).to("cuda", dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    x64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*x64, plan)
    ref_grads = torch.autograd.grad(ref, x64, dout.double())
    errors = {name: ((got.double() - want).norm() / want.norm()).item()
              for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                         (ref, *ref_grads))}
    assert_low_precision_errors(errors, tol)
    covered = torch.zeros(B, N, dtype=torch.bool, device="cuda")
    for r, spans in enumerate(rows):
        for s, e, pe in spans:
            covered[r, s:pe] = True
            alone = [x[r:r + 1, :, s:pe].detach().clone().requires_grad_() for x in (q, k, v)]
            out_d, plan_d = pbs_attention(*alone, b, S, return_plan=True,
                                          query_end=torch.tensor([e - s], device="cuda"),
                                          **kwargs)
            grads_d = torch.autograd.grad(out_d, alone, dout[r:r + 1, :, s:pe])
            blocks = slice(s // b, pe // b)
            assert torch.equal(plan.key_perm[r, :, s:pe] - s, plan_d.key_perm[0]), (r, s)
            assert torch.equal(plan.block_mask[r, :, blocks, blocks], plan_d.block_mask[0]), (r, s)
            for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                       (out_d, *grads_d)):
                got = got[r, :, s:pe].double()
                err = ((got - want[0].double()).norm() / want.double().norm()).item()
                assert err < (tol if name in ("out", "dv") else 4 * tol), (name, r, s, err)
    assert not covered.all()
    for x in (out, *grads):
        assert torch.isfinite(x).all() and not x.transpose(1, 2)[~covered].any()


def test_gpu_one_document_covering_the_row_is_bit_identical():
    q, k, v = random_qkv(2, 8, 2, 4096, 128, dtype=torch.bfloat16, device="cuda", outliers=True)
    one = torch.zeros(2, 1, dtype=torch.int64, device="cuda")
    results = []
    for docs in ({}, dict(doc_starts=one, query_end=torch.full_like(one, 4096))):
        out, plan = pbs_attention(q, k, v, threshold=0.8, return_plan=True, **docs)
        results.append((plan.key_perm, plan.block_mask, out,
                        *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for got, want in zip(*results):
        assert torch.equal(got, want)
