"""Trainer tests (CPU): config composition and errors, PBS inside transformers, the job end to end
(W&B keys, checkpoints, resume, HF export)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import pytest
import torch
from omegaconf import OmegaConf

from kernels import block_sparse_attention, pbs_attention
from tests.attention_checks import random_qkv
from tests.trainer_utils import (TINY, check, compose_config, losses, run_dirs, run_job,
                                 wandb_history_keys)
from kernels import pbs_plan
from trainer.attention import AttentionConfig, install_attention
from trainer.flex import flex_plan_attention
from trainer.model import CausalLMWithChunkedLoss, ModelConfig, architecture_config, build_model


def _build(mcfg: ModelConfig, attn: AttentionConfig, vocab_size: int, max_len: int):
    return build_model(mcfg, attn, architecture_config(mcfg, vocab_size, max_len))


# ---------------------------------------------------------------- config


def test_default_config_and_overrides():
    cfg = compose_config(["deepspeed=zero3_offload", "attention.threshold=0.5",
                          "data.seq_len=4096", "model=llama3_8b", "attention.dense_layers=[0,1]",
                          "trainer.max_steps=7"])
    assert cfg.deepspeed.stage == 3 and cfg.deepspeed.offload_param
    assert cfg.attention.threshold == 0.5 and list(cfg.attention.dense_layers) == [0, 1]
    assert cfg.data.seq_len == 4096 and cfg.model.num_layers == 32 and cfg.trainer.max_steps == 7
    default = compose_config([])
    assert default.model.num_layers == 2 and default.attention.impl == "pbs"
    assert default.data.name == "passkey" and default.deepspeed.stage == 0
    for group, option in (("deepspeed", "zero1"), ("deepspeed", "zero2_offload"),
                          ("attention", "sdpa"), ("model", "qwen2_5_7b"),
                          ("model", "llama3_1b"), ("optim", "cpu_adam")):
        assert compose_config([f"{group}={option}"])[group] is not None


def _composition_error(overrides: list[str]) -> str:
    with pytest.raises(Exception) as err:
        compose_config(overrides)
    return f"{err.value} {err.value.__cause__}"


def test_typo_and_wrong_type_fail_at_composition():
    assert "Key 'max_stepz' not in 'TrainerConfig'" in _composition_error(["trainer.max_stepz=3"])
    assert "could not be converted to Integer" in _composition_error(["trainer.max_steps=many"])
    assert "could not be converted to Float" in _composition_error(["attention.threshold=high"])
    assert "Could not find 'deepspeed/zero4'" in _composition_error(["deepspeed=zero4"])


def assert_same_logits_and_grads(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor,
                                 tol: tuple[float, float], grad_tol: tuple[float, float]) -> None:
    """Same logits (atol, rtol) and parameter gradients of a square-mean loss."""
    out_a, out_b = a(ids).logits, b(ids).logits
    torch.testing.assert_close(out_a, out_b, atol=tol[0], rtol=tol[1])
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=grad_tol[0], rtol=grad_tol[1], msg=name)


def test_cfg_job_and_cli_errors(tmp_path):
    out = check(run_job(["--cfg", "job", "trainer.max_steps=3", "deepspeed=zero2"], tmp_path))
    cfg = OmegaConf.create(out[out.index("model:"):])
    assert cfg.trainer.max_steps == 3 and cfg.deepspeed.stage == 2
    bad = run_job(["trainer.max_stepz=3"], tmp_path)
    assert bad.returncode != 0 and "max_stepz" in bad.stderr
    assert "Traceback" not in bad.stderr  # Hydra's short message, before any work
    bad = run_job(["data=jsonl", f"data.path={tmp_path}/missing.jsonl", *TINY,
                   f"trainer.output_dir={tmp_path}/out", "logging.wandb.mode=disabled"], tmp_path)
    assert bad.returncode != 0 and "missing.jsonl" in bad.stderr
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    bad = run_job(["data=jsonl", f"data.path={tmp_path}/bad.jsonl", *TINY,
                   f"trainer.output_dir={tmp_path}/out", "logging.wandb.mode=disabled"], tmp_path)
    assert bad.returncode != 0 and "bad.jsonl:2" in bad.stderr
    bad = run_job([*TINY, "trainer.max_minutes=-1", f"trainer.output_dir={tmp_path}/out",
                   "logging.wandb.mode=disabled"], tmp_path)
    assert bad.returncode != 0 and "trainer.max_minutes must be >= 0" in bad.stderr
    bad = run_job([*TINY, "logging.memory_snapshot_step=-2", f"trainer.output_dir={tmp_path}/out",
                   "logging.wandb.mode=disabled"], tmp_path)
    assert bad.returncode != 0 and "logging.memory_snapshot_step must be >= 0" in bad.stderr
    bad = run_job(["attention=flex", *TINY, f"trainer.output_dir={tmp_path}/out",
                   "logging.wandb.mode=disabled", "trainer.device=cpu"], tmp_path)
    assert bad.returncode != 0 and "needs attention.block_size a multiple of 64" in bad.stderr
    bad = run_job(["attention=flex", *TINY, "attention.block_size=64", "attention.segment_size=128",
                   f"trainer.output_dir={tmp_path}/out", "logging.wandb.mode=disabled",
                   "trainer.device=cpu"], tmp_path)
    assert bad.returncode != 0 and "attention=flex trains on CUDA only" in bad.stderr


def test_rope_scaling_override_reaches_the_model():
    from trainer.model import RopeScalingConfig, architecture_config
    cfg = ModelConfig(rope_scaling=RopeScalingConfig(rope_type="yarn", factor=4.0,
                                                     original_max_position_embeddings=256))
    config = architecture_config(cfg, vocab_size=50, max_len=1024)
    assert config.rope_parameters["rope_type"] == "yarn"
    assert config.rope_parameters["factor"] == 4.0 and config.max_position_embeddings == 1024
    assert _build(cfg, AttentionConfig(), 50, 1024).config.rope_parameters["factor"] == 4.0


# ---------------------------------------------------------------- PBS inside transformers


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pbs_in_llama_matches_sdpa_at_threshold_one(family):
    mcfg = ModelConfig(family=family, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16)
    attn = AttentionConfig(threshold=1.0, block_size=32, segment_size=64, backend="torch")
    torch.manual_seed(0)
    pbs = _build(mcfg, attn, 50, 256)
    dense = _build(mcfg, AttentionConfig(impl="sdpa"), 50, 256)
    dense.load_state_dict(pbs.state_dict())
    tracker = install_attention(pbs, attn)
    ids = torch.randint(0, 50, (2, 256))
    assert_same_logits_and_grads(pbs, dense, ids, (2e-5, 1e-4), (1e-5, 1e-3))
    assert set(tracker.reduce()) == {0, 1}
    # A threshold below 1 skips blocks: output differs, density drops below the causal total.
    install_attention(pbs, AttentionConfig(threshold=0.3, block_size=32, segment_size=64,
                                           backend="torch", dense_layers=[1]))
    with torch.no_grad():
        pbs.train()
        pbs(ids)
    tracker = pbs.model.layers[0].self_attn.pbs_settings.tracker
    assert list(tracker.reduce()) == [0]


def test_row_lengths_reach_the_pbs_plan(monkeypatch):
    """The trainer's per-row lengths (right padding) reach every PBS layer's plan, also in the
    gradient-checkpointing recompute: as one document per row (the same layout tensors for every
    call) where N is a multiple of the block size, else as ``query_end``."""
    import trainer.attention as attention_module

    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs.get("doc_starts"), kwargs["query_end"]))
        return pbs_plan(*args, **kwargs)

    monkeypatch.setattr(attention_module, "pbs_plan", spy)
    mcfg = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16)
    attn = AttentionConfig(block_size=32, segment_size=64, backend="torch")
    lm = _build(mcfg, attn, 50, 256)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    install_attention(lm, attn)
    model = CausalLMWithChunkedLoss(lm, 1024).train()
    for n in (256, 250):
        seen.clear()
        ids = torch.randint(0, 50, (2, n))
        lengths = torch.tensor([n, 100])
        loss_sum, _ = model(ids, ids, pbs_query_end=lengths)
        loss_sum.backward()
        assert len(seen) == 4  # 2 layers x (forward, recompute)
        if n % 32 == 0:
            starts, ends = seen[0]
            assert torch.equal(starts, torch.zeros(2, 1, dtype=torch.long))
            assert torch.equal(ends, lengths[:, None])
            assert all(s is starts and e is ends for s, e in seen)
        else:
            assert all(s is None and torch.equal(e, lengths) for s, e in seen)


def test_padded_rows_compute_no_padding_block(monkeypatch):
    """Each right-padded row is planned as one document: its real tokens' hidden states equal
    those of the row cut to its length (padded to a block), and no block of its padding is
    computed (rows nor columns of the block mask)."""
    import trainer.attention as attention_module

    plans = []

    def spy(*args, **kwargs):
        plans.append(pbs_plan(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(attention_module, "pbs_plan", spy)
    mcfg = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16)
    attn = AttentionConfig(block_size=32, segment_size=64, backend="torch", threshold=0.8)
    lm = _build(mcfg, attn, 50, 256)
    install_attention(lm, attn)
    model = CausalLMWithChunkedLoss(lm, 1024).eval()
    ids = torch.randint(1, 50, (2, 256))
    lengths = torch.tensor([256, 100])
    with torch.no_grad():
        hidden = model.hidden_states(ids, torch.arange(256).expand(2, -1),
                                     pbs_query_end=lengths)
        alone = model.hidden_states(ids[1:, :128], torch.arange(128)[None],
                                    pbs_query_end=lengths[1:])
    torch.testing.assert_close(hidden[1, :100], alone[0, :100], atol=2e-5, rtol=1e-5)
    for plan in plans[:2]:  # the padded batch's two layers
        mask = plan.block_mask[1]  # (Hkv, query blocks, key blocks); tokens 100.. are padding
        assert mask[:, :4, :4].any() and not mask[:, 4:].any() and not mask[:, :, 4:].any()


@pytest.mark.parametrize("backend", ["torch", "auto"])  # auto: Triton (interpreter) planning
def test_plan_then_attend_equals_pbs_attention_and_flex(backend):
    """``pbs_plan`` gives the plan of ``pbs_attention``; attending over it with the PBS kernels
    reproduces its output exactly, FlexAttention to float32 rounding (GQA, N not a multiple of
    the block size, a plan that skips blocks)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (x.detach() for x in random_qkv(2, 4, 2, 300, 32, outliers=True, generator=g))
    out, want = pbs_attention(q, k, v, 32, 64, 0.9, return_plan=True, backend=backend)
    plan = pbs_plan(q, k, 32, 64, 0.9, backend=backend)
    assert torch.equal(plan.key_perm, want.key_perm)
    assert torch.equal(plan.block_mask, want.block_mask)
    assert plan.density < pbs_plan(q, k, 32, 64, 1.0, backend=backend).density  # skips blocks
    assert torch.equal(block_sparse_attention(q, k, v, plan, backend=backend), out)
    torch.testing.assert_close(flex_plan_attention(q, k, v, plan), out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("threshold,reference", [(1.0, "sdpa"), (0.5, "pbs")])
def test_flex_in_llama_matches_sdpa_and_pbs(threshold, reference):
    """``attention=flex`` (forward only on CPU): SDPA's logits at threshold 1, and PBS's logits
    below it (threshold 0.5: at 0.9 a random-init model keeps every block)."""
    mcfg = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16)
    attn = AttentionConfig(impl="flex", threshold=threshold, block_size=32, segment_size=64,
                           backend="torch")
    ref_attn = dataclasses.replace(attn, impl=reference)
    torch.manual_seed(0)
    flex = _build(mcfg, attn, 50, 256)
    ref = _build(mcfg, ref_attn, 50, 256)
    ref.load_state_dict(flex.state_dict())
    tracker = install_attention(flex, attn)
    install_attention(ref, ref_attn)
    ids = torch.randint(0, 50, (2, 256))
    tracker.time_plans = True
    with torch.no_grad():
        torch.testing.assert_close(flex(ids).logits, ref(ids).logits, atol=2e-5, rtol=1e-4)
    densities = tracker.reduce()
    assert set(densities) == {0, 1} and (threshold == 1.0 or max(densities.values()) < 1.0)
    assert tracker.reduce_plan_ms() > 0 and tracker.reduce_plan_ms() is None


@pytest.mark.gpu
def test_gpu_flex_trains_like_pbs():
    """On CUDA, compiled Flex over the PBS plan gives the PBS kernels' logits and gradients;
    plan times come from CUDA events."""
    mcfg = ModelConfig(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=32)
    attn = AttentionConfig(impl="flex", threshold=0.5, block_size=64, segment_size=128)
    pbs_attn = dataclasses.replace(attn, impl="pbs")
    torch.manual_seed(0)
    flex = _build(mcfg, attn, 50, 1024).cuda()
    pbs = _build(mcfg, pbs_attn, 50, 1024).cuda()
    pbs.load_state_dict(flex.state_dict())
    tracker = install_attention(flex, attn)
    install_attention(pbs, pbs_attn)
    tracker.time_plans = True
    ids = torch.randint(0, 50, (2, 1024), device="cuda")
    assert_same_logits_and_grads(flex, pbs, ids, (1e-4, 1e-3), (1e-4, 1e-2))
    assert max(tracker.reduce().values()) < 1.0 and tracker.reduce_plan_ms() > 0


@pytest.mark.gpu
def test_gpu_flex_job_end_to_end(tmp_path):
    check(run_job([*TINY, "attention=flex", "attention.block_size=64", "attention.segment_size=128",
                   "model.head_dim=32", "trainer.max_steps=3", "trainer.export_hf=false",
                   f"trainer.output_dir={tmp_path}/out", "logging.wandb.mode=disabled"],
                  tmp_path))
    (run,) = run_dirs(tmp_path / "out")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 3 and all(r["attn/plan_ms"] > 0 for r in train_rows)


@pytest.mark.gpu
def test_gpu_memory_snapshot_of_one_step(tmp_path):
    """``logging.memory_snapshot_step`` dumps the allocation history of that step; the peak
    analysis finds the step's allocations, PBS planning among them."""
    from bench import memory_peak

    check(run_job([*TINY, "trainer.max_steps=3",
                   "logging.memory_snapshot_step=2", "trainer.export_hf=false",
                   f"trainer.output_dir={tmp_path}/out", "logging.wandb.mode=disabled"],
                  tmp_path))
    (run,) = run_dirs(tmp_path / "out")
    res = memory_peak.main([str(run / "memory_snapshot_step_00002.pickle")])
    assert res["peak_bytes"] > 0 and res["baseline_bytes"] > 0
    assert any(site.startswith("kernels/") for site, _ in res["sites"])


# ---------------------------------------------------------------- the job end to end


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """6 steps, checkpoints at 3 and 6 (both kept), W&B offline, block-mask images, HF export."""
    tmp = tmp_path_factory.mktemp("job")
    out = tmp / "out"
    proc = run_job([*TINY, "trainer.max_steps=6", "trainer.save_every=3",
                    "trainer.keep_checkpoints=0", "logging.image_every=3",
                    f"trainer.output_dir={out}", "logging.wandb.mode=offline"], tmp)
    return tmp, out, check(proc)


def test_default_job_end_to_end(finished_run):
    tmp, out, log = finished_run
    (run,) = run_dirs(out)
    assert "summary" in log and "eval/retrieval_acc" in log and "wandb sync" in log
    steps = losses(run)
    assert sorted(steps) == list(range(1, 7)) and steps[6] < steps[1]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    assert (run / "checkpoints" / "step_00000003").is_dir()
    assert (run / "hf" / "model.safetensors").is_file() and (run / ".hydra").is_dir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("attn/plan_ms", 0) > 0] == list(range(1, 7))


def test_wandb_offline_run_has_the_keys(finished_run):
    tmp, _, _ = finished_run
    keys = wandb_history_keys(tmp)
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_seen",
                "perf/step_time_s", "perf/tokens_per_sec", "perf/tokens_per_sec_per_gpu",
                "perf/tflops_per_gpu", "attn/density", "attn/density/layer_00",
                "attn/density/layer_01", "attn/plan_ms", "mem/peak_gb", "eval/loss", "eval/retrieval_acc",
                "eval/retrieval_acc/len_00256", "attn/block_mask"}
    assert expected <= keys, expected - keys


def test_resume_replays_the_same_losses(finished_run):
    """Copy the run's checkpoints, roll ``latest`` back to step 3 and leave a half-written step 4
    (as if the job died while saving) and resume: steps 4-6 give the uninterrupted run's losses."""
    tmp, out, _ = finished_run
    (run,) = run_dirs(out)
    resumed = tmp / "resumed"
    shutil.copytree(run / "checkpoints", resumed / "crashed" / "checkpoints")
    (resumed / "crashed" / "checkpoints" / "latest").write_text("step_00000003")
    shutil.rmtree(resumed / "crashed" / "checkpoints" / "step_00000006")
    partial = resumed / "crashed" / "checkpoints" / "step_00000004"  # a save cut short
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    check(run_job([*TINY, "trainer.max_steps=6", "trainer.resume=auto",
                   f"trainer.output_dir={resumed}", "logging.wandb.mode=disabled",
                   "trainer.export_hf=false"], tmp))
    new = [d for d in run_dirs(resumed) if d.name != "crashed"]
    assert len(new) == 1
    again = losses(new[0])
    assert sorted(again) == [4, 5, 6]
    reference = losses(run)
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(reference[step], abs=1e-6), (again, reference)


def test_hf_export_reloads_with_same_logits(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = finished_run
    (run,) = run_dirs(out)
    exported = AutoModelForCausalLM.from_pretrained(run / "hf", attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(run / "hf")
    state = torch.load(run / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    mcfg = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16)
    trained = _build(mcfg, AttentionConfig(impl="sdpa"), len(tokenizer), 256)
    trained.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()})
    ids = tokenizer("The pass key for Anna is 12345.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits)



def test_max_minutes_stops_early_then_evaluates_saves_and_exports(tmp_path):
    """A time limit (as on a cluster) ends training early; the final eval, checkpoint and HF
    export still run, at the step reached."""
    out = tmp_path / "out"
    log = check(run_job([*TINY, "trainer.max_steps=1000", "trainer.max_minutes=0.001",
                         "logging.memory_snapshot_step=1",
                         f"trainer.output_dir={out}", "logging.wandb.mode=disabled"], tmp_path))
    assert "memory snapshots need CUDA" in log  # ignored off CUDA, with a warning
    (run,) = run_dirs(out)
    last = max(losses(run))
    assert 1 <= last < 1000 and f"stopping at step {last} of 1000" in log
    assert (run / "checkpoints" / "latest").read_text() == f"step_{last:08d}"
    assert (run / "hf" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == last and "eval/retrieval_acc" in rows[-1]


def test_default_recipe_learns_retrieval(tmp_path):
    """The default data recipe (one-digit key, answer-only loss, log-uniform item lengths) with
    the default tiny model learns retrieval; shortened to 256 tokens to keep CI fast."""
    out = tmp_path / "out"
    check(run_job(["data.seq_len=256", "trainer.max_steps=200", "trainer.eval_every=0",
                   "logging.progress_bar=false", "logging.wandb.mode=disabled",
                   "trainer.save_final=false", "trainer.export_hf=false",
                   f"trainer.output_dir={out}"], tmp_path))
    (run,) = run_dirs(out)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if "eval/retrieval_acc" in line]
    before, after = evals[0]["eval/retrieval_acc"], evals[-1]["eval/retrieval_acc"]
    assert before <= 0.2 and after >= 0.3, (before, after)  # chance is 0.1


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
