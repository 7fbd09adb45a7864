"""Permutation and block selection: pure torch, and the Triton planning path against it
(interpreter on CPU)."""

import math

import pytest
import torch

from kernels import pbs_attention, pbs_plan
from kernels.plan import (
    block_pool,
    permute_keys,
    same_segment,
    segment_permutation,
    select_blocks,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(B=1, Hq=4, Hkv=2, N=512, D=32):
    return torch.randn(B, Hq, N, D), torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)


def test_key_perm_permutes_inside_complete_segments_only():
    q, k, v = _qkv(B=2, N=300)
    _, plan = pbs_attention(q, k, v, block_size=32, segment_size=64, return_plan=True, backend="torch")
    perm = plan.key_perm
    assert perm.dtype == torch.int64 and perm.shape == (2, 2, 300)
    for s in range(0, 256, 64):  # complete segments: a permutation of their own positions
        seg = perm[..., s:s + 64].sort(dim=-1).values
        assert torch.equal(seg, torch.arange(s, s + 64).expand_as(seg))
    assert torch.equal(perm[..., 256:], torch.arange(256, 300).expand(2, 2, 44))
    assert not torch.equal(perm[..., :256], torch.arange(256).expand(2, 2, 256))


@pytest.mark.parametrize("N", [64, 50])
def test_short_sequences_keep_identity_order_and_are_dense(N):
    q, k, v = _qkv(N=N)
    _, plan = pbs_attention(q, k, v, block_size=16, segment_size=64, threshold=0.1,
                            return_plan=True, backend="torch")
    assert torch.equal(plan.key_perm, torch.arange(N).expand(1, 2, N))
    nb = math.ceil(N / 16)
    assert torch.equal(plan.block_mask, torch.ones(nb, nb).tril().bool().expand(1, 4, nb, nb))
    assert plan.density == pytest.approx(1.0)


def test_heavy_hitter_keys_move_to_the_front_of_their_segment():
    q, k, v = _qkv(Hq=2, Hkv=1, N=256, D=16)
    hitters = torch.tensor([5, 40, 70, 100, 130, 190])
    direction = torch.randn(16)
    k[:, :, hitters] = 3 * direction
    q[:, :, -32:] += 2 * direction  # the last block's queries look at them
    _, plan = pbs_attention(q, k, v, block_size=32, segment_size=64, return_plan=True, backend="torch")
    perm = plan.key_perm[0, 0]
    for s in range(0, 256, 64):
        inside = hitters[(hitters >= s) & (hitters < s + 64)]
        assert set(perm[s:s + len(inside)].tolist()) == set(inside.tolist())


def test_gqa_importance_is_averaged_over_the_group():
    q, k, _ = _qkv(Hq=4, Hkv=2, N=256, D=16)
    k = k / k.norm(dim=-1, keepdim=True) * 4  # equal norms: k10 is the unique best match of k10
    perm = segment_permutation(q, k, 32, 64, 0.25)
    # A query head of group 0 pointing at key 10 alone must not move it to the front...
    q2 = q.clone()
    q2[:, 0, -32:] = k[:, 0, 10] * 50
    perm2 = segment_permutation(q2, k, 32, 64, 0.25)
    assert perm2[0, 0, 0].item() == 10
    assert torch.equal(perm2[0, 1], perm[0, 1])  # ...and leaves the other KV head alone


def test_selection_keeps_smallest_prefix_reaching_threshold():
    torch.manual_seed(0)
    B, Hq, N, D, b, S, tau = 1, 2, 512, 16, 32, 64, 0.6
    q, k, _ = _qkv(B=B, Hq=Hq, Hkv=Hq, N=N, D=D)
    perm = torch.arange(N).expand(B, Hq, N)
    mask = select_blocks(q, k, perm, b, S, tau, sink=False, scale=D ** -0.5)
    pq, pk = block_pool(q, b), block_pool(k, b)
    nb = N // b
    for h in range(Hq):
        for i in range(nb):
            allowed = [j for j in range(nb) if j * b // S < i * b // S]
            if not allowed:
                continue
            scores = torch.stack([pq[0, h, i] @ pk[0, h, j] * D ** -0.5 for j in allowed])
            probs = torch.softmax(scores, 0)
            order = torch.argsort(probs, descending=True)
            kept, mass = set(), 0.0
            for o in order.tolist():
                kept.add(allowed[o])
                mass += probs[o].item()
                if mass >= tau:
                    break
            got = {j for j in allowed if mask[0, h, i, j]}
            assert got == kept, (h, i)


def test_block_mask_always_holds_sink_and_reachable_diagonal_blocks():
    q, k, v = _qkv(N=700)
    _, plan = pbs_attention(q, k, v, block_size=32, segment_size=128, threshold=0.05,
                            return_plan=True, backend="torch")
    nb = plan.num_blocks
    assert plan.block_mask.shape == (1, 4, nb, nb)
    sink = (plan.key_perm == 0).nonzero()[:, -1] // 32  # the block token 0 landed in, per head
    assert plan.block_mask[:, :2, :, sink[0]].all() and plan.block_mask[:, 2:, :, sink[1]].all()
    diag = same_segment(nb, 32, 128, "cpu")
    causal = torch.ones(nb, nb).tril().bool()
    assert plan.block_mask[..., diag & causal].all()  # own segment, up to the diagonal
    assert not plan.block_mask[..., ~diag & ~causal].any()  # nothing in the future segments
    # a permuted diagonal block is kept only if one of its keys precedes the block's last query
    for i in range(nb):
        for j in range(nb):
            if diag[i, j] and j > i:
                reach = plan.key_perm[0, 0, j * 32:(j + 1) * 32].min() <= min(i * 32 + 31, 699)
                assert bool(plan.block_mask[0, 0, i, j]) == bool(reach)


def test_density_definition_and_threshold_one_keeps_all_causal_blocks():
    q, k, v = _qkv(N=1024)
    _, plan = pbs_attention(q, k, v, block_size=32, segment_size=64, threshold=1.0,
                            return_plan=True, backend="torch")
    nb = 32
    causal = torch.ones(nb, nb).tril().bool()
    assert plan.block_mask[..., causal].all()
    expected = plan.block_mask.sum().item() / (4 * nb * (nb + 1) / 2)
    assert plan.density == pytest.approx(expected) and 1.0 <= plan.density < 1.1
    _, sparse = pbs_attention(q, k, v, block_size=32, segment_size=64, threshold=0.5,
                              return_plan=True, backend="torch")
    assert sparse.density < plan.density


def test_permute_false_is_identity_and_forced_density_is_met():
    q, k, v = _qkv(N=4096, D=16)
    _, plan = pbs_attention(q, k, v, block_size=32, segment_size=64, permute=False,
                            density=0.2, return_plan=True, backend="torch")
    assert torch.equal(plan.key_perm, torch.arange(4096).expand(1, 2, 4096))
    assert plan.density == pytest.approx(0.2, abs=0.03)


def test_permutation_lowers_density_on_structured_attention():
    """Scattered heavy-hitter keys: permuting them together needs fewer blocks."""
    torch.manual_seed(1)
    B, Hq, N, D = 1, 2, 4096, 32
    q, k, v = torch.randn(B, Hq, N, D) * 0.3, torch.randn(B, 1, N, D) * 0.3, torch.randn(B, 1, N, D)
    direction = torch.randn(D)
    hitters = torch.randperm(N)[:N // 32]
    k[:, :, hitters] += 3 * direction
    q += direction
    dens = {}
    for permute in (True, False):
        _, plan = pbs_attention(q, k, v, block_size=64, segment_size=512, threshold=0.8,
                                permute=permute, return_plan=True, backend="torch")
        dens[permute] = plan.density
    assert dens[True] < 0.9 * dens[False], dens


@pytest.mark.parametrize("shape", [(1, 4, 2, 600, 64, 32, 64, 1024), (2, 2, 1, 300, 32, 16, 64, 128)])
def test_triton_planning_kernels_equal_the_torch_plan(shape, monkeypatch):
    """Importance (split-K two-pass, no score matrix; min_chunk 128 forces several key chunks)
    and fused pooling + bisection selection vs sort-based torch."""
    from kernels import triton_plan
    B, Hq, Hkv, N, D, b, S, min_chunk = shape
    monkeypatch.setattr(triton_plan, "_MIN_CHUNK", min_chunk)
    torch.manual_seed(N)  # no near-tie of importances that rounding could swap
    q, k = torch.randn(B, Hq, N, D, device=DEVICE), torch.randn(B, Hkv, N, D, device=DEVICE)
    q_last, n_complete = q[:, :, N - b:].reshape(B, Hkv, Hq // Hkv * b, D), N // S * S
    want = torch.softmax(q_last @ k[:, :, :n_complete].transpose(-1, -2) * D ** -0.5, -1).mean(-2)
    got = triton_plan.key_importance(q, k, n_complete, b, D ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    perm = triton_plan.triton_segment_permutation(q, k, b, S, D ** -0.5)
    assert torch.equal(perm, segment_permutation(q, k, b, S, D ** -0.5))
    for threshold, density in ((0.5, None), (0.95, None), (0.9, 0.3), (0.9, 0.05)):
        args = (perm, b, S, threshold, True, D ** -0.5, density)
        _assert_same_blocks(triton_plan.triton_select_blocks(q, k, *args),
                            select_blocks(q, permute_keys(k, perm), *args), q, k, *args)


def test_triton_segment_sort_is_a_stable_descending_argsort():
    """Exact ties (zeros included) keep position order, as in torch's stable argsort; the tail
    segment keeps identity order; S need not be a power of two."""
    import triton

    from kernels.triton_plan import _sort_segments
    BH, N, S = 2, 200, 48
    n_complete = N // S * S
    imp = torch.randint(0, 4, (BH, n_complete), device=DEVICE).float() / 7
    perm = torch.empty(BH, N, dtype=torch.int64, device=DEVICE)
    _sort_segments[(BH, triton.cdiv(N, S))](imp, perm, N, n_complete, S, BLOCK=64)
    order = torch.argsort(imp.view(BH, -1, S), dim=-1, descending=True, stable=True)
    order += torch.arange(0, n_complete, S, device=DEVICE)[:, None]
    tail = torch.arange(n_complete, N, device=DEVICE).expand(BH, -1)
    assert torch.equal(perm, torch.cat([order.flatten(1), tail], 1))


@pytest.mark.parametrize("use_budget", [True, False])
def test_triton_selection_is_exact_at_any_score_spacing(use_budget):
    """The cut-off bisection runs over the values' bits, so blocks whose scores differ by far
    less than the row's range (negative ones included) rank exactly as in a sort: top-budget
    blocks, or the smallest top set whose softmax mass reaches the threshold."""
    from kernels.triton_plan import _select_rows
    nb, density, threshold = 64, 0.4, 0.5
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    scores = torch.stack([torch.randperm(nb, generator=gen) for _ in range(nb)]).double()
    scores = (scores - nb / 2) * (1e-9 if use_budget else 1e-6)
    if use_budget:  # a 2e3 range: 1e-9 steps are far below any fixed fraction of it
        scores[:, 0] = 1e3
    else:  # row i: a top block, then n = i - 2 near-equal blocks of mass m each; the top
        # block's mass p = 0.5 - 2.5 m puts the threshold mid-way between two prefix sums
        n = (torch.arange(nb) - 2).clamp(min=1).double()
        p = (0.5 * n - 2.5) / (n - 2.5)
        scores[:, 0] = torch.where(n >= 6, torch.log(p / (1 - p) * n), torch.tensor(1e3))
    scores[:, 1] = -1e3
    scores = scores.float().to(DEVICE)
    keep = torch.empty(nb, nb, dtype=torch.int8, device=DEVICE)
    min_pos = torch.zeros(nb, dtype=torch.int32, device=DEVICE)
    _select_rows[(nb,)](scores, min_pos, keep, nb, 1, nb, 1, 1.0, threshold, density,
                        SELECT=True, USE_BUDGET=use_budget, SINK=False, BLOCK_SIZE=1,
                        BLOCK=nb)
    for i in range(2, nb):  # row i may pick among key blocks 0 .. i-1 (segments of one block)
        row = scores[i, :i].double().cpu()
        order = row.argsort(descending=True)
        if use_budget:
            n_keep = max(math.ceil(density * (i + 1)) - 1, 0)
        else:
            probs = torch.softmax(row, 0)[order]
            n_keep = int(((probs.cumsum(0) - probs) < threshold).sum())
        want = torch.zeros(i, dtype=torch.bool)
        want[order[:n_keep]] = True
        assert torch.equal(keep[i, :i].bool().cpu(), want), (i, n_keep)


# (B, Hq, Hkv, N, D, b, S, kwargs): G in {1, 4}, N not a multiple of b or S, N <= S, threshold
# < 1 and = 1, density, no sink, query_end.
PLAN_CASES = [
    (1, 4, 1, 300, 32, 16, 64, {"threshold": 0.7}),
    (2, 2, 2, 200, 64, 32, 64, {"threshold": 0.5, "sink": False, "query_end": [200, 90]}),
    (1, 4, 1, 60, 32, 16, 64, {"threshold": 0.3}),
    (1, 4, 1, 250, 32, 16, 32, {"threshold": 1.0}),
    (1, 4, 2, 256, 32, 16, 32, {"density": 0.3}),
    (1, 2, 2, 330, 32, 16, 64, {"density": 0.2, "sink": False}),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-N{}-D{}-b{}-S{}".format(*c))
def test_triton_plan_equals_the_torch_plan(case):
    B, Hq, Hkv, N, D, b, S, kwargs = case
    torch.manual_seed(N)  # no near-tie of importances that rounding could swap
    q, k = torch.randn(B, Hq, N, D, device=DEVICE), torch.randn(B, Hkv, N, D, device=DEVICE)
    if "query_end" in kwargs:
        kwargs = {**kwargs, "query_end": torch.tensor(kwargs["query_end"], device=DEVICE)}
    want = pbs_plan(q, k, b, S, backend="torch", **kwargs)
    got = pbs_plan(q, k, b, S, backend="triton", **kwargs)
    assert torch.equal(got.key_perm, want.key_perm)
    _assert_same_blocks(got.block_mask, want.block_mask, q, k, want.key_perm, b, S,
                        kwargs.get("threshold", 0.9), kwargs.get("sink", True), D ** -0.5,
                        kwargs.get("density"))


def _assert_same_blocks(got, want, q, k, key_perm, b, S, threshold, sink, scale, density):
    """Equal block masks, except in rows whose selection hinges on float rounding (the pooled
    sums may add in another order): two candidate scores within 1e-5 of each other (relative),
    or, with a threshold, the mass of a top prefix within 1e-5 of it."""
    differ = (got != want).any(-1)
    if not differ.any():
        return
    B, Hq, N, D = q.shape
    Hkv, nb = k.shape[1], math.ceil(N / b)
    pq = block_pool(q, b).view(B, Hkv, Hq // Hkv * nb, D)
    pk = block_pool(permute_keys(k, key_perm), b)
    scores = (pq @ pk.transpose(-1, -2)).view(B, Hq, nb, nb) * scale
    blk = torch.arange(nb, device=q.device)
    candidate = ~same_segment(nb, b, S, q.device) & (blk[None, :] < blk[:, None])
    s = scores.masked_fill(~candidate, float("-inf")).sort(-1, descending=True).values
    ambiguous = ((s[..., :-1] - s[..., 1:]).abs() <= 1e-5 * s[..., :-1].abs()).any(-1)
    if density is None:
        probs = torch.softmax(s, -1).nan_to_num(0.0)
        ambiguous |= ((probs.cumsum(-1) - probs - threshold).abs() < 1e-5).any(-1)
    assert not (differ & ~ambiguous).any(), (differ & ~ambiguous).nonzero()


@pytest.mark.parametrize("triton", [False, True])
def test_query_end_ranks_keys_by_the_last_real_queries(triton):
    """With ``query_end`` (right-padded batches), importance comes from the ``b`` queries before
    each sequence's end: equal to the plain plan of q with those rows moved to the end."""
    from kernels.triton_plan import triton_segment_permutation
    permutation = triton_segment_permutation if triton else segment_permutation
    B, Hq, Hkv, N, D, b, S = 3, 4, 2, 320, 32, 32, 64
    device = DEVICE if triton else "cpu"
    q, k = torch.randn(B, Hq, N, D, device=device), torch.randn(B, Hkv, N, D, device=device)
    end = torch.tensor([320, 150, 20], device=device)  # full, padded, shorter than one block
    moved = q.clone()
    for i, e in enumerate(end.tolist()):
        s = max(0, e - b)
        moved[i, :, N - b:] = q[i, :, s:s + b]
    got = permutation(q, k, b, S, D ** -0.5, query_end=end)
    want = permutation(moved, k, b, S, D ** -0.5)
    assert torch.equal(got, want)
    assert not torch.equal(got[1], permutation(q, k, b, S, D ** -0.5)[1])


def test_query_end_is_validated():
    q, k, v = _qkv(B=2, N=128)
    for bad, msg in ((torch.tensor([128]), "shape"), (torch.tensor([1.0, 2.0]), "int32/int64"),
                     ([128, 128], "int32/int64")):
        with pytest.raises(ValueError, match=msg):
            pbs_attention(q, k, v, block_size=32, segment_size=64, query_end=bad, backend="torch")
