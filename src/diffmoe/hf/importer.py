"""Import a transformers checkpoint (llama, mixtral, qwen2_moe) as a diffmoe run directory.

    read_hf_config(hf_dir)  -> (arch, ModelConfig)        config.json; refuses what diffmoe cannot represent
    read_hf_weights(hf_dir) -> {name: tensor}             model.safetensors or its index.json shards
    import_hf(hf_dir, out)  -> out                        config.yaml + checkpoints/step-00000000 (+ tokenizer.json)

Only configurations diffmoe computes exactly are accepted: anything else (a bias, a non-default rope
type, a sliding window, a shared expert, QK-norm, LayerNorm models such as phimoe...) is refused with
one ``ValueError`` line naming the field. Weights are read from safetensors only (never pickle).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, MoEConfig, RunConfig, save_config
from ..moe import FAMILIES
from .mapping import ARCHS, from_hf

_OTHER = {  # model types refused by name, with the reason
    "phimoe": "PhiMoE normalises with LayerNorm (mean-centred, with bias); diffmoe uses RMSNorm",
    "olmoe": "OLMoE has QK-norm (q_norm/k_norm), which diffmoe does not have",
    "qwen3": "Qwen3 has QK-norm (q_norm/k_norm), which diffmoe does not have",
    "qwen3_moe": "Qwen3-MoE has QK-norm (q_norm/k_norm), which diffmoe does not have",
}


def _refuse(field: str, value, why: str):
    raise ConfigError(f"cannot import: {field}={value!r}: {why}")


def _bad_weights(message: str):
    """The HF directory's weights cannot be read or mapped: a CheckpointError (a ValueError)."""
    from ..train.checkpoint import CheckpointError

    return CheckpointError(message)


def _rope_theta(c: dict) -> float:
    """rope_theta, top-level (4.x) or in rope_parameters (5.x); refuses any rope type but default."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = c.get(key)
        if rope:
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                _refuse(f"{key}.rope_type", kind, "only the default RoPE is supported")
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta")
    if theta is None:
        _refuse("rope_theta", None, "config.json must state it (class defaults differ between versions)")
    return float(theta)


def read_hf_config(hf_dir) -> tuple[str, ModelConfig]:
    """``hf_dir/config.json`` -> (arch, ModelConfig); ``ValueError`` naming the field diffmoe cannot represent."""
    path = Path(hf_dir) / "config.json"
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"cannot import: {path}: {err}") from None
    if not isinstance(c, dict):
        raise ConfigError(f"cannot import: {path}: not a JSON object")
    arch = c.get("model_type")
    if arch not in ARCHS:
        why = _OTHER.get(arch, f"supported model types are {', '.join(ARCHS)}")
        _refuse("model_type", arch, why)
    d, heads = c["hidden_size"], c["num_attention_heads"]
    for key in ("attention_bias", "mlp_bias", "qkv_bias", "lm_head_bias"):
        if c.get(key, arch == "qwen2_moe" and key == "qkv_bias"):  # 5.x's Qwen2MoeConfig defaults qkv_bias=true
            _refuse(key, c.get(key, True), "diffmoe's projections have no bias")
    if c.get("head_dim") not in (None, d // heads) or d % heads:
        _refuse("head_dim", c.get("head_dim"), f"must be hidden_size / num_attention_heads = {d // heads}")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        _refuse("hidden_act", act, "diffmoe's FFNs are SwiGLU (silu)")
    for key in ("qk_norm", "use_qk_norm"):
        if c.get(key):
            _refuse(key, c[key], "diffmoe has no QK-norm")
    max_len = c["max_position_embeddings"]
    if c.get("use_sliding_window"):
        _refuse("use_sliding_window", True, "diffmoe attends to the whole sequence")
    window = c.get("sliding_window")
    if c.get("use_sliding_window") is not False and window is not None and window < max_len:
        _refuse("sliding_window", window, f"shorter than max_position_embeddings={max_len}")
    shared = c.get("shared_expert_intermediate_size", 5632 if arch == "qwen2_moe" else 0)  # the class default
    if shared > 0:
        _refuse("shared_expert_intermediate_size", shared, "diffmoe has no shared expert")

    n_layers, ffn, moe = c["num_hidden_layers"], "dense", MoEConfig()
    k = c.get("num_experts_per_tok", 2)
    balance = c.get("router_aux_loss_coef", 0.0) * k  # HF's f counts all k slots: its coef = balance_coef / k
    if arch in ("mixtral", "qwen2_moe"):
        kind, read = _importing_family(arch)
        families = {kind: read(c)}
    if arch == "mixtral":
        ffn = kind
        moe = MoEConfig(
            num_experts=c["num_local_experts"], d_ff=c["intermediate_size"], balance_coef=balance, families=families
        )
    elif arch == "qwen2_moe":
        step, dense_only = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers") or [])
        experts = c.get("num_experts", 0)
        ffn = [
            kind if i not in dense_only and experts > 0 and (i + 1) % step == 0 else "dense" for i in range(n_layers)
        ]
        moe = MoEConfig(
            num_experts=max(experts, 1), d_ff=c["moe_intermediate_size"], balance_coef=balance, families=families
        )
    cfg = ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=d,
        n_layers=n_layers,
        n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads") or heads,
        d_ff=c["intermediate_size"],
        max_seq_len=max_len,
        rope_theta=_rope_theta(c),
        norm_eps=c.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        ffn=ffn,
        moe=moe,
    )
    return arch, cfg


def _importing_family(arch: str):
    """(kind, config.json dict -> family config) of the family whose layers ``arch``'s MoE layers import as."""
    for kind, family in FAMILIES.items():
        if family.native is not None and arch in family.native.imports:
            return kind, family.native.imports[arch]
    raise ConfigError(f"cannot import {arch}: no registered routing family reads its MoE layers")


def read_hf_weights(hf_dir) -> dict[str, torch.Tensor]:
    """The tensors of ``hf_dir/model.safetensors`` or of the shards its ``model.safetensors.index.json`` lists
    (safetensors only: a pickled ``pytorch_model.bin`` is refused)."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif any(hf_dir.glob("pytorch_model*.bin")):
        raise _bad_weights(
            f"{hf_dir}: only pickled pytorch_model*.bin weights; diffmoe reads safetensors only "
            "(convert them with transformers' save_pretrained, which writes safetensors)"
        )
    else:
        raise _bad_weights(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(load_file(str(hf_dir / shard)))
    return weights


class _Used(dict):
    """A dict that records which keys were read (to find checkpoint tensors nothing consumed)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used: set[str] = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)


def _ignorable(name: str, hf: dict[str, torch.Tensor], tied: bool) -> bool:
    """Tensors that carry nothing: an empty shared expert (zero-size projections; its gate then scales a
    zero output), a stored rotary table, a tied lm_head."""
    if ".shared_expert" in name:
        layer = name.split(".shared_expert")[0]
        return hf.get(f"{layer}.shared_expert.down_proj.weight", torch.ones(1)).numel() == 0
    return name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")


def _map_weights(hf: dict[str, torch.Tensor], arch: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The HF tensors as a diffmoe state dict; a missing or left-over tensor is a ``ValueError``."""
    moe_layers = {i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)}
    tracked = _Used(hf)
    try:
        state = from_hf(tracked, arch, cfg.n_layers, moe_layers, cfg.moe.num_experts, cfg.tie_embeddings)
    except KeyError as err:
        raise _bad_weights(f"cannot import: the checkpoint lacks tensor {err.args[0]}") from None
    left = sorted(name for name in set(hf) - tracked.used if not _ignorable(name, hf, cfg.tie_embeddings))
    if left:
        raise _bad_weights(
            f"cannot import: {len(left)} checkpoint tensors have no diffmoe counterpart, e.g. {left[:3]}"
        )
    return state


def import_hf(hf_dir, out_run_dir, data_dir=None) -> Path:
    """Write ``out_run_dir`` as a diffmoe run: config.yaml, checkpoints/step-00000000 (the HF weights, a
    fresh AdamW state, phase ``moe``, layout ``imported``), and ``out_run_dir/tokenizer.json`` copied from
    ``hf_dir`` if it has one. ``data_dir`` becomes ``data.path`` of the config. Returns ``out_run_dir``.
    ``load_run(out_run_dir)`` then gives the model; its logits equal transformers' in float32."""
    from ..model import Decoder
    from ..train.checkpoint import save_checkpoint
    from ..train.optim import build_optimizer

    hf_dir, out = Path(hf_dir), Path(out_run_dir)
    arch, model_cfg = read_hf_config(hf_dir)
    state = _map_weights(read_hf_weights(hf_dir), arch, model_cfg)
    run = RunConfig(model=model_cfg)
    if data_dir is not None:
        run.data.path = str(data_dir)
    model = Decoder(model_cfg)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise _bad_weights(f"cannot import: diffmoe names missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, value in state.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise _bad_weights(
                f"cannot import: {name} has shape {tuple(value.shape)}, the config implies {tuple(own[name].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    save_config(run, str(out / "config.yaml"))
    trainer_state = {
        "phase": "moe",
        "skipped_steps": 0,
        "bad_in_a_row": 0,
        "tokens": 0,
        "world": 1,
        "layout": "imported",
    }
    save_checkpoint(out, 0, model, build_optimizer(model, run.train), trainer_state, keep=run.train.keep_checkpoints)
    if (hf_dir / "tokenizer.json").is_file():
        shutil.copyfile(hf_dir / "tokenizer.json", out / "tokenizer.json")
    return out
