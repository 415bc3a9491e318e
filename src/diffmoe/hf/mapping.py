"""Weight names between diffmoe's ``Decoder`` and transformers' native causal LMs, both directions.

    diffmoe                      llama / mixtral / qwen2_moe (``model.`` prefix)
    embed.weight                 embed_tokens.weight
    blocks.i.attn_norm.weight    layers.i.input_layernorm.weight
    blocks.i.attn.w{q,k,v,o}     layers.i.self_attn.{q,k,v,o}_proj.weight
    blocks.i.ffn_norm.weight     layers.i.post_attention_layernorm.weight
    norm.weight                  norm.weight
    lm_head.weight               lm_head.weight (no ``model.``; absent when tied)

FFN of layer i (``blocks.i.ffn.``), by architecture:

    dense w1 / w3 / w2           llama, qwen2_moe dense layers: mlp.{gate,up,down}_proj.weight
    router.weight                mixtral: block_sparse_moe.gate.weight; qwen2_moe: mlp.gate.weight
    experts.w1[j] / w3[j] / w2[j]  mixtral: block_sparse_moe.experts.j.{w1,w3,w2}.weight
                                 qwen2_moe: mlp.experts.j.{gate,up,down}_proj.weight

Experts are written in the legacy per-expert layout, which transformers 4.57 and 5.x both read (5.x
fuses them on load). Reading also accepts 5.x's fused layout (``experts.gate_up_proj`` [E, 2f, d] =
cat(w1, w3) on dim 1, ``experts.down_proj`` [E, d, f]). Qwen2-MoE's shared expert is written empty
(zero-size projections, a zero gate), which leaves its output unchanged.
"""

from __future__ import annotations

import torch

ARCHS = ("llama", "mixtral", "qwen2_moe")

_ATTN = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
}
_DENSE = {
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}
_MOE = {  # arch -> (router name, expert prefix, names of w1, w3, w2)
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp.gate.weight", "mlp.experts", ("gate_proj", "up_proj", "down_proj")),
}


def to_hf(
    state: dict[str, torch.Tensor], arch: str, n_layers: int, moe_layers: set[int], tied: bool
) -> dict[str, torch.Tensor]:
    """diffmoe ``state`` (``Decoder.state_dict()``) -> the tensors of ``arch``'s checkpoint.

    moe_layers: indices of layers whose FFN is an MoE layer (router + experts); the others are dense.
    """
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not tied:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out.update({dst + h: state[src + d] for d, h in _ATTN.items()})
        if i not in moe_layers:
            out.update({dst + h: state[src + d] for d, h in _DENSE.items()})
            continue
        router, experts, names = _MOE[arch]
        out[dst + router] = state[src + "ffn.router.weight"]
        for d_name, h_name in zip(("w1", "w3", "w2"), names):
            stack = state[src + f"ffn.experts.{d_name}"]
            out.update({f"{dst}{experts}.{j}.{h_name}.weight": stack[j] for j in range(stack.shape[0])})
        if arch == "qwen2_moe":
            d = state["embed.weight"].shape[1]
            empty = state["embed.weight"].new_zeros
            out.update(
                {
                    dst + "mlp.shared_expert.gate_proj.weight": empty(0, d),
                    dst + "mlp.shared_expert.up_proj.weight": empty(0, d),
                    dst + "mlp.shared_expert.down_proj.weight": empty(d, 0),
                    dst + "mlp.shared_expert_gate.weight": empty(1, d),
                }
            )
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(
    hf: dict[str, torch.Tensor], arch: str, n_layers: int, moe_layers: set[int], num_experts: int, tied: bool
) -> dict[str, torch.Tensor]:
    """The tensors of ``arch``'s checkpoint -> a diffmoe state dict (legacy or fused expert layout).
    Raises KeyError naming a missing tensor."""
    state = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    state["lm_head.weight"] = hf["model.embed_tokens.weight"] if tied else hf["lm_head.weight"]
    for i in range(n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        state.update({dst + d: hf[src + h] for d, h in _ATTN.items()})
        if i not in moe_layers:
            state.update({dst + d: hf[src + h] for d, h in _DENSE.items()})
            continue
        router, experts, names = _MOE[arch]
        if src + router not in hf and src + "mlp.gate.weight" in hf:  # 5.x fused Mixtral: mlp.gate, mlp.experts
            router, experts = "mlp.gate.weight", "mlp.experts"
        state[dst + "ffn.router.weight"] = hf[src + router]
        fused = f"{src}{experts}.gate_up_proj"
        if fused in hf:
            w13, w2 = hf[fused], hf[f"{src}{experts}.down_proj"]
            f = w13.shape[1] // 2
            stacks = (w13[:, :f], w13[:, f:], w2)
        else:
            stacks = tuple(
                torch.stack([hf[f"{src}{experts}.{j}.{name}.weight"] for j in range(num_experts)]) for name in names
            )
        for d_name, stack in zip(("w1", "w3", "w2"), stacks):
            state[dst + f"ffn.experts.{d_name}"] = stack.contiguous()
    return state
