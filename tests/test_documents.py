"""Packed documents (shared/design/packing.md): every document of a packed row equals
``pbs_attention`` on that document alone, on the torch path and through the Triton kernels
(interpreter on CPU); the sink is the block holding each document's first token; one document
covering the row is today's call bit for bit; bad layouts give clear errors."""

import pytest
import torch

from kernels import (PBSPlan, block_sparse_attention, doc_starts_from_position_ids, pbs_attention,
                     pbs_plan, reference_attention, token_mask)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_pack(gen, B, N, b, S, max_docs=5, tail_gap=(False,), max_blocks=None):
    """Per row, 2 .. max_docs documents of random block counts (1 .. ``max_blocks``, default
    2 S / b + 1, so some are shorter than a segment and some end in an incomplete tail segment)
    filling the row, or, where
    ``tail_gap[row]``, all but a trailing stretch that no document covers; in about 70 % of the
    documents the real end lies up to b - 1 tokens before the padded end. Returns doc_starts,
    query_end (B, M) int64 and per row the (start, real end, padded end) spans."""
    nb, seg = N // b, S // b
    max_blocks = max_blocks or 2 * seg + 1
    rows = []
    for r in range(B):
        gap = int(torch.randint(1, 3, (), generator=gen)) if tail_gap[r % len(tail_gap)] else 0
        while True:  # the last document takes the rest: keep draws where it fits the range too
            n_docs = int(torch.randint(2, max_docs + 1, (), generator=gen))
            blocks = torch.randint(1, max_blocks + 1, (n_docs,), generator=gen)
            blocks[-1] = nb - gap - blocks[:-1].sum()
            if 1 <= blocks[-1] <= max_blocks:
                break
        spans, start = [], 0
        for n in blocks.tolist():
            pad = int(torch.randint(0, b, (), generator=gen))
            pad *= int(torch.rand((), generator=gen) < 0.7)
            spans.append((start, start + n * b - pad, start + n * b))
            start += n * b
        rows.append(spans)
    M = max(len(r) for r in rows)
    starts = torch.full((B, M), N, dtype=torch.int64)
    ends = torch.full((B, M), N, dtype=torch.int64)
    for r, spans in enumerate(rows):
        for d, (s, e, _) in enumerate(spans):
            starts[r, d], ends[r, d] = s, e
    return starts, ends, rows


def test_random_packs_cover_the_layouts():
    """The packs of PACK_CASES hold documents shorter than a segment, of whole segments, with an
    incomplete tail segment, with pads after their real end, 2 to 5 per row, and rows with a
    tail that no document covers."""
    seen = set()
    for B, _, _, N, _, b, S, _, tail_gap in PACK_CASES:
        _, _, rows = random_pack(torch.Generator().manual_seed(N + b), B, N, b, S,
                                 tail_gap=tail_gap)
        for spans in rows:
            assert 2 <= len(spans) <= 5
            seen.add("gap" if spans[-1][2] < N else "full row")
            for s, e, pe in spans:
                seen.add("short" if pe - s < S else "tail" if (pe - s) % S else "segments")
                seen.add("pads" if e < pe else "aligned end")
    assert seen == {"gap", "full row", "short", "tail", "segments", "pads", "aligned end"}, seen


def _relative(got, want):
    assert torch.isfinite(got).all(), "NaN/inf"
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()


# (B, Hq, Hkv, N, D, b, S, kwargs, tail gap per row): GQA, B = 2 with different documents per
# row and a row whose tail no document covers, thresholds < 1, the density mode, G = 1.
PACK_CASES = [
    (2, 2, 1, 384, 32, 32, 64, {"threshold": 0.6}, (False, True)),
    (1, 2, 1, 512, 64, 32, 128, {"density": 0.3}, (True,)),
    (1, 2, 2, 256, 32, 16, 32, {"threshold": 0.8, "sink": False}, (False,)),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", PACK_CASES,
                         ids=lambda c: "B{}-Hq{}-Hkv{}-N{}-D{}-b{}-S{}".format(*c))
def test_each_document_equals_pbs_attention_on_it_alone(case, backend):
    B, Hq, Hkv, N, D, b, S, kwargs, tail_gap = case
    gen = torch.Generator().manual_seed(N + b)  # a fixed draw: no near-tie decides the plan
    starts, ends, rows = random_pack(gen, B, N, b, S, tail_gap=tail_gap)
    q, k, v = (torch.randn(B, h, N, D, generator=gen).to(DEVICE).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    starts, ends = starts.to(DEVICE), ends.to(DEVICE)
    out, plan = pbs_attention(q, k, v, b, S, doc_starts=starts, query_end=ends, return_plan=True,
                              backend=backend, **kwargs)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    # Against the float64 dense reference with the packed plan's token mask.
    x64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*x64, plan)
    ref_grads = torch.autograd.grad(ref, x64, dout.double())
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert _relative(got, want) < 1e-5

    covered = torch.zeros(B, N, dtype=torch.bool)
    for r, spans in enumerate(rows):
        for s, e, pe in spans:
            covered[r, s:pe] = True
            alone = [x[r:r + 1, :, s:pe].detach().clone().requires_grad_() for x in (q, k, v)]
            length = torch.tensor([e - s], device=DEVICE)
            out_d, plan_d = pbs_attention(*alone, b, S, query_end=length, return_plan=True,
                                          backend=backend, **kwargs)
            grads_d = torch.autograd.grad(out_d, alone, dout[r:r + 1, :, s:pe])
            blocks = slice(s // b, pe // b)
            assert torch.equal(plan.key_perm[r, :, s:pe] - s, plan_d.key_perm[0]), (r, s)
            assert torch.equal(plan.block_mask[r, :, blocks, blocks], plan_d.block_mask[0]), (r, s)
            for got, want in zip((out, *grads), (out_d, *grads_d)):
                assert _relative(got[r, :, s:pe], want[0]) < 1e-5, (r, s, e)
        nb_row = plan.block_mask[r].sum((0, 2)) + plan.block_mask[r].sum((0, 1))
        outside = ~covered[r, ::b].to(DEVICE)
        assert not nb_row[outside].any()  # blocks outside documents: never computed
    gap = ~covered.to(DEVICE)
    assert bool(gap.any()) == any(tail_gap[r % len(tail_gap)] for r in range(B))
    for x in (out, *grads):  # outside documents: output and gradients exactly 0
        assert not x.transpose(1, 2)[gap].any()
    # Block mask: block-diagonal over documents; density over causal blocks inside them.
    causal = sum(n * (n + 1) / 2 for spans in rows for n in ((pe - s) // b for s, _, pe in spans))
    assert plan.density == pytest.approx(plan.block_mask.sum().item() / (Hq * causal))
    if backend == "triton":  # the same plan as the torch path
        want = pbs_plan(q, k, b, S, doc_starts=starts, query_end=ends, backend="torch", **kwargs)
        assert torch.equal(plan.key_perm, want.key_perm)
        assert torch.equal(plan.block_mask, want.block_mask)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_document_covering_the_row_is_todays_call_bit_for_bit(backend):
    B, Hq, Hkv, N, D, b, S = 2, 2, 1, 192, 32, 32, 64
    q, k, v = (torch.randn(B, h, N, D, device=DEVICE, requires_grad=True) for h in (Hq, Hkv, Hkv))
    dout = torch.randn(B, Hq, N, D, device=DEVICE)
    one = torch.zeros(B, 1, dtype=torch.int64, device=DEVICE)
    real_end = torch.tensor([N, N - 5], device=DEVICE)  # a padded row: its pads in its last block
    for kwargs, plain, docs in (
            ({"threshold": 0.6}, {}, dict(doc_starts=one, query_end=torch.full_like(one, N))),
            ({"density": 0.25}, dict(query_end=real_end),
             dict(doc_starts=one, query_end=real_end[:, None]))):
        results = []
        for extra in (plain, docs):
            out, plan = pbs_attention(q, k, v, b, S, return_plan=True, backend=backend,
                                      **kwargs, **extra)
            results.append((plan, out, *torch.autograd.grad(out, (q, k, v), dout)))
        (want_plan, *want), (got_plan, *got) = results
        assert torch.equal(got_plan.key_perm, want_plan.key_perm)
        assert torch.equal(got_plan.block_mask, want_plan.block_mask)
        assert got_plan.density == want_plan.density
        for x, y in zip(got, want):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sink_is_the_block_holding_each_documents_first_token(backend):
    """Each document's first token is the least important key of its first segment: the
    permutation moves it to that segment's last block, and that block (not the segment's first
    permuted block) is computed by every query block of the document."""
    D, b, S, N = 32, 16, 32, 256
    starts = torch.tensor([[0, 96, 160, N]])  # 96 / 64 / 96 tokens: each longer than a segment
    q, k = torch.randn(1, 1, N, D), torch.randn(1, 1, N, D)
    direction = torch.randn(D)
    q += 2 * direction
    for s in starts[0, :3].tolist():
        k[0, 0, s] = -4 * direction  # the doc's first token: least attended by its last queries
    q, k = q.to(DEVICE), k.to(DEVICE)
    for kwargs in ({"threshold": 0.05}, {"density": 0.1, "permute": False}):
        permuted = kwargs.get("permute", True)
        for docs, layout in (([(0, N)], {}), ([(0, 96), (96, 160), (160, N)],
                                              {"doc_starts": starts.to(DEVICE)})):
            plan = pbs_plan(q, k, b, S, backend=backend, **layout, **kwargs)
            no_sink = pbs_plan(q, k, b, S, sink=False, backend="torch", **layout, **kwargs)
            for s, e in docs:
                sink = int((plan.key_perm[0, 0] == s).nonzero()) // b
                assert sink == (s // b + S // b - 1 if permuted else s // b)
                assert plan.block_mask[0, :, s // b:e // b, sink].all(), (kwargs, s)
                # later segments compute it because of the sink rule, not by score
                later = slice(s // b + S // b, e // b)
                assert not no_sink.block_mask[0, :, later, sink].all(), (kwargs, s)


def test_dense_document_plan_is_causal_attention_inside_each_document():
    """threshold=1, permute=False (the dense document-masked baseline, e.g. for Flex): exactly
    causal attention inside each document, pads included; nothing outside documents."""
    B, Hq, N, D, b, S = 2, 2, 256, 32, 16, 64
    starts = torch.tensor([[0, 48, 160], [0, 128, N]])
    ends = torch.tensor([[40, 150, 230], [128, 200, N]])
    q, k, v = torch.randn(B, Hq, N, D), torch.randn(B, 1, N, D), torch.randn(B, 1, N, D)
    plan = pbs_plan(q, k, b, S, threshold=1.0, permute=False, doc_starts=starts, query_end=ends,
                    backend="torch")
    want = torch.zeros(B, N, N, dtype=torch.bool)
    pos = torch.arange(N)
    for r in range(B):
        for s, e in zip(starts[r].tolist(), ends[r].tolist()):
            if s < N:
                pe = -(-e // b) * b
                want[r, s:pe, s:pe] = pos[s:pe, None] >= pos[None, s:pe]
    assert torch.equal(token_mask(plan, Hq), want[:, None].expand(B, Hq, N, N))
    assert plan.density == 1.0 and torch.equal(plan.density_per_head(), torch.ones(B, Hq))
    out = block_sparse_attention(q, k, v, plan, backend="torch")
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.expand(B, Hq, N, D), v.expand(B, Hq, N, D), attn_mask=want[:, None])
    rows = want.any(-1)[:, None, :, None]
    torch.testing.assert_close(out, torch.where(rows, sdpa, 0.0), atol=1e-6, rtol=1e-5)


def test_flex_runs_the_document_plan():
    """``trainer.flex``: the same plan by FlexAttention (eager on CPU) equals the reference."""
    from trainer.flex import flex_block_mask, flex_plan_attention
    B, Hq, Hkv, N, D, b, S = 2, 4, 2, 256, 32, 16, 64
    starts = torch.tensor([[0, 48, 160, N], [0, 96, 112, 224]])
    ends = torch.tensor([[40, 150, 230, N], [90, 112, 200, 256]])
    q, k, v = torch.randn(B, Hq, N, D), torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
    for kwargs in ({"threshold": 0.5}, {"threshold": 1.0, "permute": False}):
        plan = pbs_plan(q, k, b, S, doc_starts=starts, query_end=ends, backend="torch", **kwargs)
        diag = plan.diagonal_segment_mask()
        assert diag.shape == (B, 1, N // b, N // b)
        bm = flex_block_mask(plan, compiled=False)
        full = bm.full_kv_num_blocks + bm.kv_num_blocks
        assert torch.equal(full, plan.block_mask.sum(-1, dtype=torch.int32))
        assert torch.equal(bm.kv_num_blocks, (plan.block_mask & diag).sum(-1, dtype=torch.int32))
        got = flex_plan_attention(q, k, v, plan)  # rows outside documents: 0 too
        torch.testing.assert_close(got, reference_attention(q, k, v, plan), atol=1e-5,
                                   rtol=1e-5)


def test_triton_document_importance_over_several_key_chunks(monkeypatch):
    """Per-document importance (split-K row pass with a document axis; _MIN_CHUNK 64 gives
    documents several chunks, and programs past a document's keys exit) and the per-segment
    sort, against torch on each document's slice."""
    from kernels import triton_plan
    from kernels.plan import document_layout, segment_permutation
    monkeypatch.setattr(triton_plan, "_MIN_CHUNK", 64)
    B, Hq, Hkv, N, D, b, S = 2, 2, 1, 512, 32, 16, 64
    G, scale = Hq // Hkv, D ** -0.5
    starts = torch.tensor([[0, 320, 384, N], [0, 16, 96, 416]], device=DEVICE)
    ends = torch.tensor([[300, 380, 500, N], [10, 96, 410, 512]], device=DEVICE)
    torch.manual_seed(7)  # no near-tie of importances that rounding could swap
    q, k = torch.randn(B, Hq, N, D, device=DEVICE), torch.randn(B, Hkv, N, D, device=DEVICE)
    docs = document_layout(starts, ends, N, b)
    complete = docs.complete_keys(S, b)
    imp = triton_plan.key_importance(q, k, N // S * S, b, scale, docs=docs, complete=complete,
                                     block_size=b)
    perm = triton_plan.triton_segment_permutation(q, k, b, S, scale, docs=docs)
    checked = 0
    for r, spans in enumerate(docs.spans(b)):
        for d, (s, e, pe) in enumerate(spans):
            nc = int(complete[r, d])
            if nc:
                first = max(e - b, s)
                rows = q[r, :, first:first + b].reshape(Hkv, G * b, D)
                want = torch.softmax(rows @ k[r, :, s:s + nc].transpose(-1, -2) * scale, -1)
                torch.testing.assert_close(imp[r, :, s:s + nc], want.mean(-2), rtol=1e-4,
                                           atol=1e-7)
                checked += nc > 2 * 64  # several chunks
            alone = segment_permutation(q[r:r + 1, :, s:pe], k[r:r + 1, :, s:pe], b, S, scale,
                                        torch.tensor([e - s], device=DEVICE))
            assert torch.equal(perm[r, :, s:pe] - s, alone[0]), (r, s)
        assert torch.equal(perm[r, :, spans[-1][2]:], torch.arange(spans[-1][2], N,
                                                                   device=DEVICE).expand(Hkv, -1))
    assert checked >= 2


def test_triton_index_lists_use_document_relative_segments():
    """Full (no token mask) vs part (own segment) lists follow each document's segments."""
    from kernels.triton_attention import BlockIndex
    B, Hq, N, D, b, S = 1, 2, 256, 32, 16, 64
    starts = torch.tensor([[0, 48, 160]], device=DEVICE)
    q, k = torch.randn(B, Hq, N, D, device=DEVICE), torch.randn(B, 1, N, D, device=DEVICE)
    plan = pbs_plan(q, k, b, S, threshold=1.0, doc_starts=starts, backend="triton")
    index = BlockIndex.from_plan(plan)
    segments = plan.block_segments()
    assert segments[0].tolist() == [0, 0, 0, 3, 3, 3, 3, 7, 7, 7, 10, 10, 10, 10, 14, 14]
    diag = plan.diagonal_segment_mask()
    for name, sel in (("full", plan.block_mask & ~diag), ("part", plan.block_mask & diag)):
        assert torch.equal(getattr(index, f"{name}_kv_cnt"), sel.sum(-1, dtype=torch.int32))
        assert torch.equal(getattr(index, f"{name}_q_cnt"), sel.sum(-2, dtype=torch.int32))


def test_doc_starts_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1],
                        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
                        [5, 6, 7, 0, 1, 2, 0, 1, 2, 3, 4, 5]])
    assert doc_starts_from_position_ids(pos).tolist() == [[0, 4, 10], [0, 12, 12], [0, 3, 6]]
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        doc_starts_from_position_ids(pos[0])


def test_document_values_are_checked_once_per_tensor(monkeypatch):
    """The value checks (a device sync on CUDA) run once per doc_starts / query_end object and
    version: every layer of a forward passes the same tensors."""
    from kernels import attention
    calls = []
    check = attention._check_document_values
    monkeypatch.setattr(attention, "_check_document_values",
                        lambda *a: calls.append(1) or check(*a))
    q, k = torch.randn(1, 2, 128, 32), torch.randn(1, 1, 128, 32)
    starts, ends = torch.tensor([[0, 64]]), torch.tensor([[50, 128]])
    for _ in range(3):
        pbs_plan(q, k, 16, 32, doc_starts=starts, query_end=ends, backend="torch")
    assert len(calls) == 1
    ends[0, 0] = 60  # changed in place: checked again
    pbs_plan(q, k, 16, 32, doc_starts=starts, query_end=ends, backend="torch")
    pbs_plan(q, k, 16, 32, doc_starts=starts, backend="torch")  # another query_end
    pbs_plan(q, k, 32, 64, doc_starts=starts, backend="torch")  # another block size
    assert len(calls) == 4
    ends[0, 0] = 70
    with pytest.raises(ValueError, match="next start"):
        pbs_plan(q, k, 16, 32, doc_starts=starts, query_end=ends, backend="torch")


_N = 128


@pytest.mark.parametrize("starts,ends,message", [
    ([[0.0, 64.0]], None, "int32/int64"),
    ([0, 64], None, r"shape \(B, M\)"),
    ([[0, 64], [0, 32]], None, r"shape \(B, M\)"),
    ([[16, 64]], None, "start at 0"),
    ([[0, 40]], None, "multiples of block_size"),
    ([[0, 64, 64]], None, "strictly increasing"),
    ([[0, 64, 32]], None, "strictly increasing"),
    ([[0, _N, 64]], None, "strictly increasing"),
    ([[0, 160]], None, r"lie in \[0, N"),
    ([[0, 64]], [[70, 100]], "next start"),
    ([[0, 64]], [[0, 128]], "next start"),
    ([[0, 64]], [[60, 130]], "next start"),
    ([[0, 64]], [100], r"query_end must have shape \(B, M\)"),
    ([[0, 64]], [[60.0, 128.0]], "int32/int64"),
])
def test_bad_document_layouts_raise_clear_errors(starts, ends, message):
    q, k = torch.randn(1, 2, _N, 32), torch.randn(1, 1, _N, 32)
    starts = torch.tensor(starts)
    ends = None if ends is None else torch.tensor(ends)
    with pytest.raises(ValueError, match=message):
        pbs_plan(q, k, 16, 32, doc_starts=starts, query_end=ends, backend="torch")


def test_bad_document_arguments_raise_clear_errors():
    q, k = torch.randn(1, 2, 120, 32), torch.randn(1, 1, 120, 32)
    with pytest.raises(ValueError, match="multiple of block_size"):
        pbs_plan(q, k, 16, 32, doc_starts=torch.tensor([[0]]), backend="torch")
    with pytest.raises(ValueError, match="int32/int64"):
        pbs_plan(q, k, 8, 32, doc_starts=[[0]], backend="torch")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="doc_starts is on"):
            pbs_plan(q.cuda(), k.cuda(), 8, 32, doc_starts=torch.tensor([[0]]), backend="torch")


def test_plan_without_documents_keeps_its_shapes():
    """Existing callers: ``diagonal_segment_mask`` (nb, nb), densities over all causal blocks."""
    plan = PBSPlan(torch.arange(64).expand(1, 1, 64), torch.ones(1, 2, 4, 4).tril().bool(), 16, 32)
    assert plan.diagonal_segment_mask().shape == (4, 4) and plan.block_segments() is None
    assert plan.density == 1.0 and torch.equal(plan.density_per_head(), torch.ones(1, 2))
