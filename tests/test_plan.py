"""Permutation and block selection (pure torch, CPU)."""

import math

import pytest
import torch

from kernels import pbs_attention
from kernels.plan import block_pool, same_segment, segment_permutation, select_blocks


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
    assert plan.block_mask[..., 0].all()  # sink
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


@pytest.mark.parametrize("shape", [(1, 4, 2, 600, 64, 32, 64), (2, 2, 1, 300, 32, 16, 64)])
def test_triton_planning_kernels_equal_the_torch_plan(shape):
    """Importance (two-pass, no score matrix) and bisection selection vs sort-based torch."""
    B, Hq, Hkv, N, D, b, S = shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = torch.randn(B, Hq, N, D, device=device), torch.randn(B, Hkv, N, D, device=device)
    from kernels.triton_plan import key_importance
    q_last, n_complete = q[:, :, N - b:].reshape(B, Hkv, Hq // Hkv * b, D), N // S * S
    want = torch.softmax(q_last @ k[:, :, :n_complete].transpose(-1, -2) * D ** -0.5, -1).mean(-2)
    got = key_importance(q_last, k[:, :, :n_complete], D ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    perm = segment_permutation(q, k, b, S, D ** -0.5, use_triton=True)
    k_perm = torch.gather(k, 2, perm[..., None].expand_as(k))
    for threshold, density in ((0.5, None), (0.95, None), (0.9, 0.3), (0.9, 0.05)):
        args = (q, k_perm, perm, b, S, threshold, True, D ** -0.5, density)
        assert torch.equal(select_blocks(*args), select_blocks(*args, use_triton=True))


@pytest.mark.parametrize("use_triton", [False, True])
def test_query_end_ranks_keys_by_the_last_real_queries(use_triton):
    """With ``query_end`` (right-padded batches), importance comes from the ``b`` queries before
    each sequence's end: equal to the plain plan of q with those rows moved to the end."""
    B, Hq, Hkv, N, D, b, S = 3, 4, 2, 320, 32, 32, 64
    q, k = torch.randn(B, Hq, N, D), torch.randn(B, Hkv, N, D)
    end = torch.tensor([320, 150, 20])  # full, padded, shorter than one block
    moved = q.clone()
    for i, e in enumerate(end.tolist()):
        s = max(0, e - b)
        moved[i, :, N - b:] = q[i, :, s:s + b]
    got = segment_permutation(q, k, b, S, D ** -0.5, use_triton, query_end=end)
    want = segment_permutation(moved, k, b, S, D ** -0.5, use_triton)
    assert torch.equal(got, want)
    assert not torch.equal(got[1], segment_permutation(q, k, b, S, D ** -0.5, use_triton)[1])


def test_query_end_is_validated():
    q, k, v = _qkv(B=2, N=128)
    for bad, msg in ((torch.tensor([128]), "shape"), (torch.tensor([1.0, 2.0]), "int32/int64"),
                     ([128, 128], "int32/int64")):
        with pytest.raises(ValueError, match=msg):
            pbs_attention(q, k, v, block_size=32, segment_size=64, query_end=bad, backend="torch")
