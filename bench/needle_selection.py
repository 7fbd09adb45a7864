"""Does the PBS plan keep the key a retrieval head reads? (CPU; any exported passkey model)

For passkey eval items, the model runs densely; each layer's q and k are recorded. A head is
"sharp" on an item when the answer query puts more than ``--sharp`` of its attention on one key
in an earlier segment (the needle). For each threshold, with and without permutation, the plan
built from the same q and k either selects the block holding that key for the answer's query
block (a hit) or not: a miss means PBS attention cannot read the needle there.

    python3 -m bench.needle_selection runs/accuracy/A-lr0.001/hf --seq-len 4096 --items 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kernels import pbs_plan
from trainer.data import PasskeyDataset

_RECORDED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    _RECORDED[module.layer_idx] = (query.detach(), key.detach())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("record_qk", _recording_attention)


def needle_hits(q: torch.Tensor, k: torch.Tensor, answer_query: int, args: argparse.Namespace,
                configs: list[tuple[float, bool]]) -> dict[tuple[float, bool], list[int]]:
    """[hits, sharp heads] per (threshold, permute) for one layer of one item."""
    _, Hq, N, D = q.shape
    G = Hq // k.shape[1]
    scale = D ** -0.5
    keys = k.repeat_interleave(G, 1)[0]  # (Hq, N, D), fine at CPU sizes
    logits = torch.einsum("hd,hnd->hn", q[0, :, answer_query], keys) * scale
    weight = torch.softmax(logits.masked_fill(torch.arange(N) > answer_query, float("-inf")), -1)
    top_w, top = weight.max(-1)
    own_segment_start = answer_query // args.segment_size * args.segment_size
    sharp = [h for h in range(Hq) if top_w[h] > args.sharp and top[h] < own_segment_start]
    out = {}
    for threshold, permute in configs:
        plan = pbs_plan(q, k, args.block_size, args.segment_size, threshold, permute=permute,
                        scale=scale, backend="torch")
        hits = 0
        for h in sharp:
            p = int((plan.key_perm[0, h // G] == top[h]).nonzero()[0])
            hits += int(plan.block_mask[0, h, answer_query // args.block_size,
                                        p // args.block_size])
        out[threshold, permute] = [hits, len(sharp)]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", help="exported model folder (config, safetensors, tokenizer)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--items", type=int, default=16, help="eval items (default 16)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9])
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--segment-size", type=int, default=256)
    p.add_argument("--sharp", type=float, default=0.5, help="min weight on the top key (0.5)")
    p.add_argument("--digits", type=int, default=1, help="passkey digits (default 1)")
    p.add_argument("--out", type=Path, default=None, help="also write JSON here")
    args = p.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="record_qk",
                                                 dtype=torch.float32).eval()
    items = PasskeyDataset(tokenizer, args.seq_len, 0, digits=args.digits, answer_only_loss=True,
                           length=args.items, split="eval")
    configs = [(t, permute) for t in args.thresholds for permute in (True, False)]
    totals = {c: [0, 0] for c in configs}
    per_layer: dict[int, dict] = {}
    for i in range(args.items):
        item = items[i]
        answer_query = int(item["answer_mask"].nonzero()[0]) - 1  # predicts the first digit
        _RECORDED.clear()
        with torch.no_grad():
            model(item["input_ids"][None])
        for layer, (q, k) in sorted(_RECORDED.items()):
            for c, (hits, n) in needle_hits(q, k, answer_query, args, configs).items():
                totals[c][0] += hits
                totals[c][1] += n
                layer_row = per_layer.setdefault(layer, {c2: [0, 0] for c2 in configs})
                layer_row[c][0] += hits
                layer_row[c][1] += n

    def fmt(c):
        return f"threshold {c[0]}, {'PBS (permuted)' if c[1] else 'no permutation'}"

    lines = ["| plan | needle block selected / sharp heads | " +
             " | ".join(f"layer {layer}" for layer in sorted(per_layer)) + " |",
             "|---|---|" + "---|" * len(per_layer)]
    for c in configs:
        lines.append(f"| {fmt(c)} | {totals[c][0]} / {totals[c][1]} | " + " | ".join(
            f"{per_layer[layer][c][0]} / {per_layer[layer][c][1]}" for layer in sorted(per_layer))
            + " |")
    print("\n".join(lines))
    result = {"model": args.model, "seq_len": args.seq_len, "items": args.items,
              "block_size": args.block_size, "segment_size": args.segment_size,
              "sharp": args.sharp,
              "rows": [{"threshold": c[0], "permute": c[1], "hits": totals[c][0],
                        "sharp_heads": totals[c][1],
                        "per_layer": {str(layer): per_layer[layer][c] for layer in per_layer}}
                       for c in configs]}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
