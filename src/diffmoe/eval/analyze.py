"""Routing analysis: what each MoE layer does per domain, and expert utilisation over training.

- Layers that merge experts per segment: the average routing-weight vector per domain per layer (the
  specialisation figure of arXiv 2405.03133) and the share of segments where each expert's weight
  exceeds 2/E.
- Layers that assign tokens to experts: the expert load (share of assignments) per
  domain per layer.
Plots are written as PNG heatmaps (one panel per layer, domains x experts), plus the utilisation
curves read from the run's metrics.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_text_atomic
from ..model import Decoder
from ..moe.routing import usage_threshold


@torch.no_grad()
def routing_by_domain(model: Decoder, dataset, max_rows: int = 64, batch_size: int = 8) -> dict:
    """Per layer: {"kind", "measure", "domains", "weights" [D, E], "usage" [D, E]} from up to
    ``max_rows`` single-domain held-out rows per domain, in the model's current routing mode.

    A layer that merges experts reports every routed segment's weights
    (``stats["routed_segment_weights"]``): "weights" is their mean over the domain's segments
    ("measure": "weight") and "usage" the share of those segments in which each expert's weight
    exceeds 2/E. Other layers report their load per batch:
    "weights" is its mean over the domain's batches ("measure": "load"; no "usage")."""
    device = next(model.parameters()).device
    layers = model.moe_layers()
    sums = {i: [] for i, _ in layers}
    usage = {i: [] for i, _ in layers}
    domains = []
    with model.inference():
        for domain in dataset.domains:
            rows = dataset.rows_of_domain(domain)[:max_rows]
            if len(rows) == 0:
                continue
            domains.append(domain)
            acc = {i: [] for i, _ in layers}
            use = {i: [] for i, _ in layers}
            for start in range(0, len(rows), batch_size):
                ids = torch.stack([dataset[int(r)]["input_ids"] for r in rows[start : start + batch_size]])
                model(ids.to(device))
                for i, layer in layers:
                    if "routed_segment_weights" in layer.stats:
                        routed = layer.stats["routed_segment_weights"]
                        if routed.numel():
                            acc[i].append(routed.cpu())
                            use[i].append((routed > usage_threshold(layer.num_experts)).float().cpu())
                    else:
                        acc[i].append(layer.stats["load"].reshape(1, -1).cpu())
            for i, layer in layers:
                sums[i].append(torch.cat(acc[i]).mean(0) if acc[i] else torch.full((layer.num_experts,), float("nan")))
                if use[i]:
                    usage[i].append(torch.cat(use[i]).mean(0))
    out = {}
    for i, layer in layers:
        merged = "routed_segment_weights" in layer.stats
        entry = {
            "kind": type(layer).__name__,
            "measure": "weight" if merged else "load",
            "domains": domains,
            "weights": torch.stack(sums[i]).tolist() if sums[i] else [],
        }
        if usage[i]:
            entry["usage"] = torch.stack(usage[i]).tolist()
        out[f"layer{i}"] = entry
    return out


def plot_routing(result: dict, path: Path, title: str, dpi: int = 110) -> Path:
    """Heatmaps (domains x experts), one panel per MoE layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols, 0.5 * len(result[names[0]]["domains"]) * rows + 1.8), squeeze=False
    )
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        entry = result[name]
        data = np.array(entry["weights"])
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_title(f"{name} ({entry['measure']})", fontsize=9)
        ax.set_yticks(range(len(entry["domains"])), entry["domains"], fontsize=8)
        ax.set_xticks(range(data.shape[1]), [str(e) for e in range(data.shape[1])], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_utilisation(records: list[dict], path: Path, title: str) -> Path | None:
    """Experts in use and load imbalance (E x the largest expert's share; 1 = balanced) per layer over
    training, from the ``routing`` records of metrics.jsonl."""
    rows = [r for r in records if r.get("kind") == "routing"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({k.split(".")[0] for r in rows for k in r if k.endswith(".load")}, key=lambda k: int(k[5:]))
    fig, (ax_use, ax_imb) = plt.subplots(1, 2, figsize=(10, 3.5))
    for layer in layers:
        pts = [r for r in rows if f"{layer}.load" in r]
        steps = [r["step"] for r in pts]
        ax_use.plot(steps, [r[f"{layer}.experts_in_use"] for r in pts], marker="o", ms=3, label=layer)
        ax_imb.plot(
            steps, [max(r[f"{layer}.load"]) * len(r[f"{layer}.load"]) for r in pts], marker="o", ms=3, label=layer
        )
    ax_use.set(xlabel="step", ylabel="experts in use")
    ax_imb.set(xlabel="step", ylabel="E x max load share")
    ax_use.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(obj, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))
