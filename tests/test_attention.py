"""PBS attention against the float64 reference: torch path and Triton kernels (interpreter on
CPU). Every check draws fresh random inputs."""

import pytest
import torch
import torch.nn.functional as F

from attention_checks import assert_low_precision_errors, random_qkv, relative_errors
from kernels import PBSPlan, block_sparse_attention, pbs_attention, pbs_plan, reference_attention

# Triton runs on the GPU when there is one, else under the interpreter (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_torch_backend_matches_reference_and_threshold_one_is_causal():
    q, k, v = random_qkv(2, 4, 2, 300, 32)
    _, errors = relative_errors(q, k, v, threshold=0.7, backend="torch")
    assert max(errors.values()) < 1e-5, errors
    out = pbs_attention(q, k, v, block_size=32, segment_size=64, threshold=1.0, backend="torch")
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                           is_causal=True)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


# (B, Hq, Hkv, N, D, block, segment, threshold): G in {1, 2, 4, 8}, D in {64, 128}, N not a
# multiple of the block or segment, N <= S, batch > 1.
TRITON_CASES = [
    (1, 2, 2, 200, 64, 32, 64, 0.5),
    (2, 2, 1, 161, 64, 16, 32, 0.4),
    (1, 4, 1, 150, 64, 16, 32, 0.6),
    (1, 8, 1, 96, 64, 16, 32, 0.6),
    (1, 2, 1, 130, 128, 16, 32, 0.5),
    (1, 2, 1, 60, 64, 32, 64, 0.3),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-N{}-D{}-b{}-S{}-t{}".format(*c))
def test_triton_kernels_match_float64_reference(case):
    B, Hq, Hkv, N, D, b, S, tau = case
    q, k, v = random_qkv(B, Hq, Hkv, N, D, device=DEVICE)
    plan, errors = relative_errors(q, k, v, threshold=tau, block_size=b, segment_size=S,
                                   backend="triton")
    assert max(errors.values()) < 1e-5, errors
    nb = plan.num_blocks
    off_segment = (torch.ones(nb, nb, device=plan.block_mask.device).tril().bool()
                   & ~plan.diagonal_segment_mask())
    if off_segment.sum() > 2:
        assert not plan.block_mask[..., off_segment].all(), "no block was skipped"


def test_triton_threshold_one_equals_causal_attention():
    q, k, v = random_qkv(1, 4, 2, 140, 64, device=DEVICE)
    out = pbs_attention(q, k, v, block_size=16, segment_size=32, threshold=1.0, backend="triton")
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                           is_causal=True)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
def test_triton_half_precision_with_outliers(dtype, tol):
    q, k, v = random_qkv(1, 4, 2, 160, 64, dtype=dtype, outliers=True, device=DEVICE)
    _, errors = relative_errors(q, k, v, threshold=0.8, block_size=16, segment_size=32,
                                backend="triton")
    assert_low_precision_errors(errors, tol)


def test_triton_without_permutation_and_forced_density():
    q, k, v = random_qkv(1, 2, 1, 256, 64, device=DEVICE)
    plan, errors = relative_errors(q, k, v, block_size=16, segment_size=32, permute=False,
                                   density=0.3, backend="triton")
    assert torch.equal(plan.key_perm.cpu(), torch.arange(256).expand(1, 1, 256))
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_without_allowed_keys_give_zero_not_nan(backend):
    """A hand-made plan whose block mask drops the diagonal of query block 1."""
    B, H, N, D, b = 1, 2, 64, 64, 16
    q, k, v = random_qkv(B, H, H, N, D)
    mask = torch.ones(4, 4).tril().bool()
    mask[1, :] = False
    plan = PBSPlan(torch.arange(N).expand(B, H, N).clone(), mask.expand(B, H, 4, 4).clone(), b, b)
    if backend == "triton":
        q, k, v = (x.detach().to(DEVICE).requires_grad_() for x in (q, k, v))
        plan = PBSPlan(plan.key_perm.to(DEVICE), plan.block_mask.to(DEVICE), b, b)
    out = block_sparse_attention(q, k, v, plan, backend=backend)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert out[:, :, 16:32].abs().max() == 0 and q.grad[:, :, 16:32].abs().max() == 0
    assert out[:, :, 32:].abs().min() > 0


def test_triton_backward_is_deterministic():
    q, k, v = random_qkv(1, 4, 1, 128, 64, device=DEVICE)
    grads = []
    for _ in range(2):
        for x in (q, k, v):
            x.grad = None
        out = pbs_attention(q, k, v, block_size=16, segment_size=32, threshold=0.7,
                            backend="triton")
        out.backward(torch.ones_like(out))
        grads.append([x.grad.clone() for x in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,message", [
    (dict(q=torch.randn(2, 64, 32)), "4 dims"),
    (dict(k=torch.randn(1, 3, 64, 32), v=torch.randn(1, 3, 64, 32)), "multiple of key/value heads"),
    (dict(k=torch.randn(1, 2, 64, 64), v=torch.randn(1, 2, 64, 64)), "head dims differ"),
    (dict(v=torch.randn(1, 2, 64, 8)), "k and v shapes differ"),
    (dict(k=torch.randn(1, 2, 32, 32), v=torch.randn(1, 2, 32, 32)), "sequence lengths differ"),
    (dict(k=torch.randn(2, 2, 64, 32), v=torch.randn(2, 2, 64, 32)), "batch sizes differ"),
    (dict(segment_size=40), "multiple of block_size"),
    (dict(threshold=0.0), "threshold must be in (0, 1]"),
    (dict(threshold=1.5), "threshold must be in (0, 1]"),
    (dict(density=2.0), "density must be in (0, 1]"),
    (dict(q=torch.randn(1, 4, 64, 32).int()), "unsupported dtype"),
    (dict(q=torch.randn(1, 4, 64, 32).half()), "dtypes differ"),
    (dict(backend="cuda"), "backend must be"),
    (dict(scale=-0.1), "scale must be a positive"),
    (dict(backend="triton", q=torch.randn(1, 4, 64, 24), k=torch.randn(1, 2, 64, 24),
          v=torch.randn(1, 2, 64, 24)), "head dims"),
])
def test_bad_input_raises_clear_value_error(kwargs, message):
    args = dict(q=torch.randn(1, 4, 64, 32), k=torch.randn(1, 2, 64, 32),
                v=torch.randn(1, 2, 64, 32), block_size=16, segment_size=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        pbs_attention(**args)


@pytest.mark.parametrize("seg_blocks", [1, 3, 20])
def test_block_index_lists_are_compacted_rows_in_order(seg_blocks):
    """One launch per orientation gives the full (off-segment) and part (own segment) lists of
    every row, zero past the count."""
    from kernels.triton_attention import _compact
    mask = torch.rand(2, 3, 9, 13) > 0.4
    for m in (mask, mask.transpose(-1, -2)):
        R, C = m.shape[-2:]
        seg = torch.arange(R)[:, None] // seg_blocks == torch.arange(C)[None, :] // seg_blocks
        lists = _compact(m.to(DEVICE), seg_blocks)
        for (count, idx), sel, width in ((lists[:2], m & ~seg, C),
                                         (lists[2:], m & seg, min(seg_blocks, C))):
            assert idx.shape == (*m.shape[:-1], width)
            assert idx.dtype == torch.int16 and count.dtype == torch.int32
            for row, c, ids in zip(sel.reshape(-1, C), count.cpu().flatten(),
                                   idx.cpu().reshape(-1, width)):
                want = torch.nonzero(row).flatten()
                assert c.item() == len(want) and torch.equal(ids[:c].long(), want)
                assert not ids[c:].any()


def test_block_index_from_plan_equals_the_masked_lists():
    """``BlockIndex.from_plan`` = the compacted rows and columns of block_mask & ~diag (full)
    and block_mask & diag (part, width min(S / b, nb))."""
    from kernels.triton_attention import BlockIndex
    nb = 13
    mask = torch.rand(1, 2, nb, nb, device=DEVICE) > 0.5
    for S in (16, 48, 256):
        plan = PBSPlan(torch.arange(200, device=DEVICE).expand(1, 1, 200), mask, 16, S)
        index = BlockIndex.from_plan(plan)
        diag = plan.diagonal_segment_mask()
        for name, sel, width in (("full", plan.block_mask & ~diag, nb),
                                 ("part", plan.block_mask & diag, min(S // 16, nb))):
            for side, m in (("kv", sel), ("q", sel.transpose(-1, -2))):
                want_idx = torch.zeros(*m.shape[:-1], width, dtype=torch.int16)
                for pos, row in zip(want_idx.view(-1, width), m.cpu().reshape(-1, nb)):
                    cols = torch.nonzero(row).flatten()
                    pos[:len(cols)] = cols
                assert torch.equal(getattr(index, f"{name}_{side}_cnt").cpu(),
                                   m.sum(-1, dtype=torch.int32).cpu())
                assert torch.equal(getattr(index, f"{name}_{side}_idx").cpu(), want_idx)


def test_triton_reads_original_order_kv_through_the_permutation(monkeypatch):
    """K/V enter the Function unpermuted (strided views here, q and v not even dense): no gather node in
    the autograd graph, the Function saves k and v themselves, the permuted copies read by the
    forward and dQ kernels are freed after their kernel (before the dK/dV kernel runs), and dk/dv
    come back in original order."""
    import weakref

    from kernels import triton_attention

    copies = []
    make_copies, launch_dkdv = triton_attention.permuted_kv, triton_attention.launch_dkdv

    def tracked_copies(*args):
        kv_perm = make_copies(*args)
        copies.extend(weakref.ref(x) for x in kv_perm)
        return kv_perm

    def dkdv_after_copies_freed(*args, **kwargs):
        assert len(copies) == 4 and all(ref() is None for ref in copies)
        launch_dkdv(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "permuted_kv", tracked_copies)
    monkeypatch.setattr(triton_attention, "launch_dkdv", dkdv_after_copies_freed)
    B, Hq, Hkv, N, D, b, S = 1, 4, 2, 150, 64, 16, 32
    q_base = torch.randn(B, N, Hq, 2 * D, device=DEVICE, requires_grad=True)  # q not dense either
    q = q_base[..., :D].transpose(1, 2)
    k_base = torch.randn(B, N, Hkv, D, device=DEVICE, requires_grad=True)  # (B, N, H, D) layout
    v_base = torch.randn(B, N, Hkv, 2 * D, device=DEVICE, requires_grad=True)
    k, v = k_base.transpose(1, 2), v_base[..., D:].transpose(1, 2)
    plan = pbs_plan(q, k, block_size=b, segment_size=S, threshold=0.6, backend="triton")
    assert not torch.equal(plan.key_perm, torch.arange(N, device=DEVICE).expand(B, Hkv, N))
    out = block_sparse_attention(q, k, v, plan, backend="triton")
    assert len(copies) == 2 and all(ref() is None for ref in copies)
    saved = [t for t in out.grad_fn.saved_tensors if t.shape == k.shape]
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {k.data_ptr(), v.data_ptr()}
    nodes, seen = [out.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        assert "Gather" not in type(node).__name__ and "Scatter" not in type(node).__name__
        nodes.extend(n for n, _ in node.next_functions)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert len(copies) == 4
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, plan)
    ref.backward(dout.double())
    for got, want in ((out, ref), (q_base.grad[..., :D].transpose(1, 2), q64.grad),
                      (k_base.grad.transpose(1, 2), k64.grad),
                      (v_base.grad[..., D:].transpose(1, 2), v64.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
    assert v_base.grad[..., :D].abs().max() == 0 and q_base.grad[..., D:].abs().max() == 0


def test_triton_inputs_that_cannot_back_a_tma_descriptor():
    """A q row pitch that is not a multiple of 16 bytes (D + 1 fp32 values) and the broadcast
    gradient of ``out.sum()`` (stride 0) cannot back the kernels' TMA descriptors: they are
    copied contiguous first (k and v, read through pointers, are used as they are), and the
    results still match the float64 reference."""
    B, Hq, Hkv, N, D, b, S = 1, 2, 1, 96, 64, 16, 32
    bases = [torch.randn(B, h, N, D + 1, device=DEVICE, requires_grad=True)
             for h in (Hq, Hkv, Hkv)]
    q, k, v = (x[..., :D] for x in bases)
    assert q.stride(-2) * q.element_size() % 16 != 0
    plan = pbs_plan(q, k, block_size=b, segment_size=S, threshold=0.8, backend="triton")
    out = block_sparse_attention(q, k, v, plan, backend="triton")
    out.sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, plan)
    ref.sum().backward()
    for got, want in ((out, ref), *((x.grad[..., :D], y.grad) for x, y in
                                    zip(bases, (q64, k64, v64)))):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


def test_triton_dkdv_runs_heavy_key_tiles_first_and_stays_exact():
    """Key tiles far above the mean work start first, heaviest first (here every head's sink,
    computed by all query blocks, then a lighter column of KV head 1), then the other tiles in
    index order (key tiles fastest). Uniform masks keep index order. Gradients match float64."""
    from kernels.triton_attention import BlockIndex, dkdv_tile_order
    B, Hq, Hkv, N, D, b, S = 2, 4, 2, 256, 32, 16, 32
    nb = N // b
    blk = torch.arange(nb, device=DEVICE)
    causal = blk[None, :] <= blk[:, None]
    own = (blk[:, None] // (S // b) == blk[None, :] // (S // b)) & causal
    mask = (own | (blk[None, :] == 0)).expand(B, Hq, nb, nb).clone()
    mask[:, 2:, :, 4] |= causal[:, 4]  # query heads 2, 3 = KV head 1: key block 4 too
    segments = torch.rand(B, Hkv, N // S, S, device=DEVICE).argsort(-1)
    key_perm = (segments + torch.arange(0, N, S, device=DEVICE)[:, None]).flatten(2)
    plan = PBSPlan(key_perm, mask, b, S)
    order = dkdv_tile_order(BlockIndex.from_plan(plan), Hkv, nb, 1).tolist()
    heavy = [0, nb, 2 * nb, 3 * nb, nb + 4, 3 * nb + 4]  # (b * Hkv + hk) * nb + key tile
    assert order == heavy + [i for i in range(B * Hkv * nb) if i not in heavy]
    uniform = ((torch.rand(B, Hq, nb, nb, device=DEVICE) < 0.5) | (blk[:, None] == blk)) & causal
    order = dkdv_tile_order(BlockIndex.from_plan(PBSPlan(key_perm, uniform, b, S)), Hkv, nb, 1)
    assert order.tolist() == list(range(B * Hkv * nb))

    q, k, v = random_qkv(B, Hq, Hkv, N, D, device=DEVICE)
    out = block_sparse_attention(q, k, v, plan, backend="triton")
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, plan)
    ref.backward(dout.double())
    for got, want in ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert torch.isfinite(got).all()
        assert (got.double() - want).norm() / want.norm() < 1e-4
