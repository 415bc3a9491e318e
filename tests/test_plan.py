"""The analytic memory / communication planner (diffmoe.parallel.plan) and ``diffmoe plan``.

Numbers below are computed by hand from the rules in the plan's module docstring for a tiny model:
vocab 64, d 16, 2 layers, 2 heads (head_dim 8), d_ff 32, context 32, 8 sequences per step.

    embed 64x16 = 1024, lm_head 1024, final norm 16                                   root   2064
    per block: 2 norms 32, wq/wk/wv/wo 4 x 256 = 1024,                                        1056
               Lory / top-k: router 4x16 = 64, experts 3 x (4x32x16) = 6144 (E 4)             6208
    total with MoE blocks: 2064 + 2 x 7264 = 16592
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffmoe.cli import main
from diffmoe.config import ConfigError, RunConfig
from diffmoe.model.decoder import Decoder
from diffmoe.parallel import plan as P
from diffmoe.parallel.layout import Layout

CONFIG_12 = str(Path(__file__).resolve().parents[1] / "configs" / "12-paper-0.3b-lory-32e.yaml")
TINY = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=32)


def run_config(ffn="lory", batch=8, micro=1, bf16=True, **model):
    moe = {"num_experts": 4, "lory": {"segment_len": 8}, "topk": {"top_k": 2}}
    return RunConfig.from_dict(
        {
            "model": {**TINY, "ffn": ffn, "moe": moe, **model},
            "data": {"batch_size": batch, "micro_batch_size": micro},
            "train": {"bf16": bf16},
        }
    )


def layout_plan(cfg, layout, gpus=4, mem=1.0):
    cluster = P.Cluster(gpus, mem, reserve_gib=0)
    return P.plan_layout(cfg.model, layout, P.workload(cfg, gpus), cluster)


def comm(lp, what, mode="none"):
    """(calls, bytes) of the one line of ``lp``'s communication whose description starts with ``what``."""
    [line] = [c for c in lp.comm[mode] if c.what.startswith(what)]
    return line.calls, line.bytes


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ffn", ["dense", "lory", "topk", "sparsemixer", "expert_choice"])
@pytest.mark.parametrize("extra", [{}, {"tie_embeddings": True, "n_kv_heads": 1}])
def test_parameter_shapes_match_the_model(ffn, extra):
    cfg = run_config(ffn, **extra)
    built = {name: tuple(p.shape) for name, p in Decoder(cfg.model).named_parameters()}
    assert {s.name: s.shape for s in P.model_params(cfg.model)} == built


def test_workload_batch_split():
    w = P.workload(run_config(batch=8, micro=1), 4)
    assert (w.micro_batch, w.accum, w.tokens, w.act_bytes, w.param_dtype, w.reduce_dtype) == (
        1,
        2,
        32,
        2,
        "bfloat16",
        "float32",
    )
    assert P.workload(run_config(batch=8, micro=None), 4).micro_batch == 2  # default: batch / GPUs
    with pytest.raises(ConfigError, match="data.batch_size=8: must be a multiple"):
        P.workload(run_config(batch=8, micro=4), 4)
    with pytest.raises(ConfigError, match="divisible by the 3 GPUs"):
        P.workload(run_config(batch=8, micro=None), 3)


def test_ddp_memory_and_allreduce():
    lp = layout_plan(run_config(), Layout(4, "ddp", dp_replicate=4))
    m = lp.memory
    assert (m.params, m.grads, m.optimizer, m.buffers) == (4 * 16592, 4 * 16592, 8 * 16592, 4 * 16592)
    # bf16 autocast copies: attention 2 x 1024, lm_head 1024 (not embedding, norms, routers, Lory experts)
    assert m.copies == 2 * (2 * 1024 + 1024)
    assert comm(lp, "gradient all-reduce") == (1, 2 * 3 / 4 * 4 * 16592)


def test_fsdp_shards_and_collectives():
    lp = layout_plan(run_config(), Layout(4, "fsdp", 1, 4))
    # root shard: 64/4 x 16 x 2 + 16/4 = 516; block: norms 2 x 4, attention 4 x 4 x 16, router 1 x 16,
    # experts 3 x 1 x 512 -> 1816
    shard = 516 + 2 * 1816
    assert shard * 4 == 16592  # nothing padded at 4 ranks
    m = lp.memory
    assert (m.params, m.grads, m.optimizer, m.buffers) == (4 * shard, 4 * shard, 8 * shard, 0)
    assert m.copies == 2 * (2064 + 2 * 7264)  # bf16: the root and two blocks unsharded
    A = 2  # 8 sequences / (1 x 4 GPUs)
    assert comm(lp, "block all-gather") == (2 * A * 2, 2 * A * 2 * 3 * 1816 * 2)  # fwd+bwd, 2 blocks, bf16
    assert comm(lp, "root all-gather") == (A, A * 3 * 516 * 2)  # forward only
    assert comm(lp, "block gradient reduce-scatter") == (2 * A, A * 2 * 3 * 1816 * 4)  # fp32
    assert comm(lp, "root gradient reduce-scatter") == (A, A * 3 * 516 * 4)
    assert not [c for c in lp.comm["none"] if "HSDP" in c.what]  # no replicas


def test_fsdp_padding_when_dim0_is_smaller_than_the_group():
    lp = layout_plan(run_config(), Layout(8, "fsdp", 1, 8), gpus=8)
    # 8 ranks: router [4, 16] and experts [4, ...] pad dim 0 to 8 rows, one row per rank
    block = 2 * 2 + 4 * 2 * 16 + 1 * 16 + 3 * 1 * 512
    root = 8 * 16 + 2 + 8 * 16
    assert lp.memory.params == 4 * (root + 2 * block) == 4 * 3626


def test_etp_shards_experts_on_d_ff_and_exchanges_activations():
    lp = layout_plan(run_config(), Layout(4, "fsdp", 1, 4, etp=2))
    dense_block = 2 * 4 + 4 * 4 * 16 + 16  # on the 4 dp_shard ranks
    experts = 3 * 2 * 16 * 16  # local [4, 16, 16] (d_ff / 2), FSDP over efsdp = 2: 2 experts each
    assert lp.memory.params == 4 * (516 + 2 * (dense_block + experts))
    A, b, d = 2, 32, 16
    assert comm(lp, "experts all-gather") == (2 * A * 2, 2 * A * 2 * 1 * experts * 2)
    assert comm(lp, "experts gradient reduce-scatter") == (A * 2, A * 2 * 1 * experts * 4)
    # per Lory layer and micro-batch: (t-1) b d a for segments (fwd) and dy (bwd); the same reduce-scattered
    assert comm(lp, "etp all-gather of segments") == (2 * A * 2, 2 * A * 2 * 1 * b * d * 2)
    assert comm(lp, "etp reduce-scatter of the output") == (2 * A * 2, 2 * A * 2 * 1 * b * d * 2)
    segments = b // 8
    assert comm(lp, "etp all-gather of routing weights") == (A * 2, A * 2 * segments * 4 * 4)
    # recompute: the forward's collectives run again (+50 % of the activation traffic)
    assert comm(lp, "etp all-gather of segments", "block") == (3 * A * 2, 3 * A * 2 * b * d * 2)
    assert comm(lp, "experts all-gather", "block") == comm(lp, "experts all-gather")  # no extra all-gather


def test_ep_all_to_all_and_expert_shards():
    cfg = run_config("topk")
    lp = layout_plan(cfg, Layout(4, "fsdp", 1, 4, ep=2))
    experts = 3 * 1 * 32 * 16  # 2 local experts, FSDP over efsdp = 2: one each
    assert lp.memory.params == 4 * (516 + 2 * (2 * 4 + 4 * 4 * 16 + 16 + experts))
    A, rows = 2, 2 * 32  # top-2: k b rows per layer and micro-batch
    per = 1 / 2 * rows * 16 * 2  # (ep-1)/ep of the rows, d bf16 values each
    assert comm(lp, "ep token all-to-all") == (A * 2 * 4, A * 2 * 4 * per)  # dispatch+combine, fwd and bwd
    assert comm(lp, "ep token all-to-all", "block") == (A * 2 * 6, A * 2 * 6 * per)
    assert comm(lp, "ep count exchange") == (A * 2, A * 2 * 1 / 2 * 4 * 8)
    assert comm(lp, "balance-loss expert counts") == (A * 2, A * 2 * 2 * 3 / 4 * 4 * 4)


def test_hsdp_adds_a_replica_all_reduce_across_nodes():
    cfg = run_config(batch=16)
    lp = layout_plan(cfg, Layout(16, "fsdp", 2, 8), gpus=16)
    [ar] = [c for c in lp.comm["none"] if c.what.startswith("block gradient all-reduce over replicas")]
    assert ar.group_size == 2 and ar.intra == 0  # replicas sit on different nodes
    [rs] = [c for c in lp.comm["none"] if c.what.startswith("block gradient reduce-scatter")]
    assert rs.group_size == 8 and rs.intra == rs.bytes  # shards inside a node


def test_candidate_layouts():
    names = lambda cfg, n: [P.layout_name(lay) for lay in P.candidate_layouts(cfg.model, P.Cluster(n, 80))]  # noqa: E731
    assert names(run_config("dense"), 8) == ["ddp", "fsdp"]
    assert names(run_config("lory"), 8) == ["ddp", "fsdp", "fsdp+etp2", "fsdp+etp4", "fsdp+etp8"]
    assert names(run_config("topk"), 8) == ["ddp", "fsdp", "fsdp+ep2", "fsdp+ep4"]  # gcd(8, E=4)
    assert names(run_config("expert_choice"), 16) == ["ddp", "fsdp", "hsdp2x8"]
    assert names(run_config("topk"), 16) == [
        "ddp",
        "fsdp",
        "hsdp2x8",
        "fsdp+ep2",
        "fsdp+ep4",
        "hsdp2x8+ep2",
        "hsdp2x8+ep4",
    ]
    assert names(run_config("lory"), 1) == ["ddp"]


def test_group_placement():
    assert P.Group("ep", 8).intra_fraction(8) == 1.0
    assert P.Group("ep", 16).intra_fraction(8, all_to_all=True) == pytest.approx(7 / 15)
    assert P.Group("dp_shard", 16).intra_fraction(8) == 0.0  # a ring across nodes runs at the slow link
    assert P.Group("efsdp", 2, stride=8).intra_fraction(8, all_to_all=True) == 0.0


def test_recommendation_follows_memory():
    cfg = run_config("lory")
    gib = P.GiB
    roomy = P.make_plan(cfg, P.Cluster(4, 100.0, reserve_gib=0))
    assert roomy.recommended == "ddp" and roomy.recommended_mode == "none"  # least communication
    ddp, fsdp = roomy.layout("ddp").memory, roomy.layout("fsdp").memory
    assert fsdp.total("none") < ddp.total("none")
    squeezed = P.make_plan(cfg, P.Cluster(4, (fsdp.total("none") + ddp.total("none")) / 2 / gib, reserve_gib=0))
    tight_fits = [lp.name for lp in squeezed.layouts if lp.fits["none"]]
    assert "ddp" not in tight_fits and squeezed.recommended in tight_fits and squeezed.recommended_mode == "none"
    smallest_none = min(lp.memory.total("none") for lp in roomy.layouts)
    smallest_block = min(lp.memory.total("block") for lp in roomy.layouts)
    assert smallest_block < smallest_none
    ckpt = P.make_plan(cfg, P.Cluster(4, (smallest_block + smallest_none) / 2 / gib, reserve_gib=0))
    assert ckpt.recommended_mode == "block" and "only with per-block activation checkpointing" in ckpt.reason
    none = P.make_plan(cfg, P.Cluster(4, smallest_block / 2 / gib, reserve_gib=0))
    assert none.recommended is None and "no layout fits" in none.reason


def test_max_micro_batch():
    cfg = run_config("lory", batch=32, micro=1)
    lp = layout_plan(cfg, Layout(4, "fsdp", 1, 4))
    w = P.workload(cfg, 4)
    sizes = {
        m: P.memory(
            cfg.model, lp.layout, replace(w, micro_batch=m, accum=8 // m), P.Cluster(4, 1, reserve_gib=0)
        ).total("none")
        for m in (1, 2, 4, 8)
    }
    limit = (sizes[2] + sizes[4]) / 2
    lp = layout_plan(cfg, Layout(4, "fsdp", 1, 4), mem=limit / P.GiB)
    assert lp.max_micro_batch["none"] == 2


def test_cluster_errors_are_one_line_config_errors():
    for kwargs, flag in [
        (dict(gpus=0, gpu_mem_gib=80), "--gpus=0"),
        (dict(gpus=2, gpu_mem_gib=-1), "--gpu-mem=-1"),
        (dict(gpus=12, gpu_mem_gib=80), "--gpus=12"),
        (dict(gpus=2, gpu_mem_gib=80, gpus_per_node=0), "--gpus-per-node=0"),
    ]:
        with pytest.raises(ConfigError) as err:
            P.Cluster(**kwargs)
        assert str(err.value).startswith(f"invalid {flag}") and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------
# the activation model against what autograd really saves (CPU, bf16 parameters as under FSDP2)
def saved_bytes(model, ids) -> int:
    """Bytes of the tensors autograd saves in forward + loss (unique storages, parameters excluded),
    plus the float32 logits the training step holds until backward."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)
        F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="sum")
    return sum(n for ptr, n in seen.items() if ptr not in params) + logits.numel() * logits.element_size()


@pytest.mark.parametrize("ffn", ["dense", "lory", "topk", "expert_choice"])
def test_activation_estimate_matches_saved_tensors(ffn):
    model_cfg = dict(vocab_size=512, d_model=128, n_layers=2, n_heads=4, d_ff=352, max_seq_len=128)
    moe = {"num_experts": 4, "dispatch": "grouped_mm", "lory": {"segment_len": 32}}
    cfg = RunConfig.from_dict(
        {
            "model": {**model_cfg, "ffn": ffn, "moe": moe},
            "data": {"batch_size": 2, "micro_batch_size": 2},
            "train": {"bf16": True},
        }
    )
    model = Decoder(cfg.model).to(torch.bfloat16)
    measured = saved_bytes(model, torch.randint(0, 512, (2, 128)))
    layout = Layout(1, "fsdp", 1, 1)
    w = P.workload(cfg, 1)
    estimate = P.activation_bytes(cfg.model, layout, w, P.Precision.of(layout, w), "none")
    assert estimate == pytest.approx(measured, rel=0.05)


# ---------------------------------------------------------------------------------------------------
def test_cli_table_and_json(capsys):
    config = CONFIG_12
    assert main(["plan", config, "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "recommended: fsdp+etp" in out and "why:" in out
    assert main(["plan", config, "--gpus", "8", "--gpu-mem", "80", "--json", "model.n_layers=2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recommended"] and data["params"] < 6e9  # the override after the options applied
    modes = data["layouts"][0]["modes"]["none"]
    assert {"total_bytes", "fits", "comm_seconds", "blocking_seconds", "collectives"} <= set(modes)


def test_cli_errors(capsys):
    assert main(["plan", CONFIG_12, "--gpus", "0", "--gpu-mem", "80"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: invalid --gpus=0: must be a positive integer"
    assert main(["plan", CONFIG_12, "--gpus", "7", "--gpu-mem", "80"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_paper_32_expert_lory_fits_on_8_gpus():
    from diffmoe.config import load_config

    plan = P.make_plan(load_config(CONFIG_12), P.Cluster(8, 80))
    assert plan.recommended is not None and plan.recommended_mode == "none"
    assert math.isclose(plan.params, 6.85e9, rel_tol=0.01)
    assert plan.layout(plan.recommended).memory.total("none") < 80 * P.GiB
