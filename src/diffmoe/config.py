"""One dataclass tree for the model, with validation that names the offending field.

Every choice the papers leave open is a field here with a documented default. Configs round-trip
through plain dicts (and so YAML): ``ModelConfig.from_dict(cfg.to_dict()) == cfg``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FFN_KINDS = ("dense", "lory", "topk", "sparsemixer", "expert_choice")
LORY_FIRST_SEGMENT = ("uniform", "own_mean")
LORY_ROUTING = ("segment", "prefix", "prompt")
EC_GRANULARITY = ("token", "segment")
DISPATCH_IMPLS = ("auto", "grouped_mm", "loop")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def _check(cond: bool, field_name: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"invalid config: {field_name}={value!r}: {why}")


@dataclass
class LoryConfig:
    """Lory expert merging (arXiv 2405.03133)."""

    segment_len: int = 256
    """T: tokens per routing segment (paper: 256)."""
    first_segment: str = "uniform"
    """Routing of segment 1, which has no predecessor. ``uniform``: weights 1/E (strictly causal,
    the default; see ``LoryMoE``). ``own_mean``: the paper's rule, the segment's own mean with a
    stop-gradient on its routing weights (tokens of segment 1 then see later tokens of segment 1)."""
    routing: str = "segment"
    """``segment``: causal segment routing (training and evaluation). ``prefix``: route once from
    segment 1 for the whole sequence (the paper's ablation). ``prompt``: route once on the mean of the
    prompt and decode as a dense model (generation)."""


@dataclass
class TopKConfig:
    """Top-k token choice (Switch k=1, GShard / Mixtral k=2)."""

    top_k: int = 2
    renormalize: bool = True
    """Mixtral renormalises the k gates to sum to 1; Switch / GShard keep the raw softmax values."""
    capacity_factor: float | None = None
    """None: dropless. A number c: each expert takes at most ceil(c * tokens * k / E) assignments,
    the overflow is dropped (its slot contributes zero; the residual carries the token)."""


@dataclass
class SparseMixerConfig:
    """SparseMixer-v2 top-2 routing (GRIN, arXiv 2409.12136)."""

    jitter_eps: float = 0.01
    """Band half-width: expert i stays in the band when (z* - z_i) / max(|z_i|, z*) <= 2 * jitter_eps."""
    input_jitter_eps: float = 0.01
    """Training only: the layer input is multiplied by U(1 - eps, 1 + eps). 0 disables it."""


@dataclass
class ExpertChoiceConfig:
    """Expert choice routing (Zhou et al. 2022)."""

    capacity_factor: float = 1.0
    """c: each expert takes n * c / E tokens (or segments). The EC paper uses 2, Lory's comparison 1."""
    granularity: str = "token"
    """``token``: each expert picks tokens; ``segment``: each expert picks whole segments."""
    segment_len: int = 256


@dataclass
class MoEConfig:
    """Shared by every MoE layer kind; each kind reads its own sub-config."""

    num_experts: int = 8
    d_ff: int | None = None
    """Hidden size of one expert; None uses the model's ``d_ff`` (Lory: active size = dense size)."""
    balance_coef: float = 0.01
    """alpha of the balance loss alpha * E * sum_i f_i P_i (top-k and SparseMixer; Switch: 0.01)."""
    z_loss_coef: float = 0.0
    """Router z-loss coefficient (ST-MoE: 1e-3); top-k and SparseMixer."""
    global_balance: bool = True
    """All-reduce the assignment counts f_i across data-parallel ranks (GRIN's global balance)."""
    dispatch: str = "auto"
    """Dropless dispatch: ``grouped_mm`` (torch.nn.functional.grouped_mm), ``loop`` (a loop over
    experts; also the float64 path), or ``auto`` (the faster one for the device and dtype)."""
    router_init_std: float | None = None
    """Router init std; None uses the model's ``init_std``."""
    lory: LoryConfig = field(default_factory=LoryConfig)
    topk: TopKConfig = field(default_factory=TopKConfig)
    sparsemixer: SparseMixerConfig = field(default_factory=SparseMixerConfig)
    expert_choice: ExpertChoiceConfig = field(default_factory=ExpertChoiceConfig)


@dataclass
class ModelConfig:
    """A LLaMA-style decoder. ``ffn`` is one FFN kind for every layer or a list with one per layer."""

    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    """Grouped-query attention: None means n_heads (multi-head attention)."""
    d_ff: int = 352
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    """Std of every weight init; output projections of attention and FFN are further divided by
    sqrt(2 * n_layers) (GPT-2 / OLMo scaled init)."""
    ffn: str | list[str] = "dense"
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def layer_ffn(self, layer: int) -> str:
        return self.ffn if isinstance(self.ffn, str) else self.ffn[layer]

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "must be a positive integer")
        _check(self.d_model % self.n_heads == 0, "d_model", self.d_model,
               f"must be divisible by n_heads={self.n_heads}")
        _check(self.head_dim % 2 == 0, "d_model", self.d_model,
               f"d_model / n_heads = {self.head_dim} must be even for rotary embeddings")
        kv = self.kv_heads
        _check(isinstance(kv, int) and kv >= 1 and self.n_heads % kv == 0, "n_kv_heads", self.n_kv_heads,
               f"must divide n_heads={self.n_heads}")
        _check(self.init_std > 0, "init_std", self.init_std, "must be positive")
        kinds = [self.ffn] if isinstance(self.ffn, str) else list(self.ffn)
        if not isinstance(self.ffn, str):
            _check(len(kinds) == self.n_layers, "ffn", self.ffn,
                   f"a list must have one entry per layer (n_layers={self.n_layers})")
        for kind in kinds:
            _check(kind in FFN_KINDS, "ffn", kind, f"unknown FFN kind; choose one of {', '.join(FFN_KINDS)}")
        validate_moe(self.moe, prefix="moe", kinds=kinds)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> "ModelConfig":
        return _from_dict(cls, data, where)


@dataclass
class DataConfig:
    """Where training data comes from: a directory written by ``diffmoe prepare``."""

    path: str = "data"
    batch_size: int = 8
    """Sequences per micro-batch (per process under torchrun)."""
    eval_batches: int | None = 8
    """Held-out batches per periodic evaluation (None: the whole held-out split)."""


@dataclass
class TrainConfig:
    """The optimisation loop. Steps count optimizer updates; one step is ``grad_accum`` micro-batches."""

    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_frac: float = 0.05
    """Linear warm-up over this fraction of the steps (Lory: 5 %)."""
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    """AdamW decay on matrices (embeddings, projections, experts, routers); none on norms."""
    grad_clip: float = 1.0
    grad_accum: int = 1
    bf16: bool = False
    """bfloat16 autocast for the forward pass (master weights stay float32)."""
    compile: bool = False
    """Run the model's forward under ``torch.compile`` (``diffmoe bench model`` measures whether it pays;
    the first steps compile, which takes tens of seconds on CPU)."""
    seed: int = 0
    dense_warmup_frac: float = 0.0
    """Lory's dense warm-up: train a dense model for this fraction of the steps, then copy its FFN into
    every expert and continue as MoE (paper: 0.05). 0 disables it."""
    log_every: int = 10
    routing_log_every: int = 50
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    max_bad_steps: int = 10
    """A step whose loss or gradient is not finite is skipped; this many in a row stop the run."""
    tensorboard: bool = True


@dataclass
class RunConfig:
    """Everything ``diffmoe train`` needs: ``model``, ``data`` and ``train`` sections of one YAML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.model.validate()
        d, t = self.data, self.train
        _check(isinstance(d.batch_size, int) and d.batch_size >= 1, "data.batch_size", d.batch_size,
               "must be a positive integer")
        _check(d.eval_batches is None or d.eval_batches >= 1, "data.eval_batches", d.eval_batches,
               "must be a positive integer or null")
        for name in ("steps", "grad_accum", "log_every", "routing_log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "max_bad_steps"):
            value = getattr(t, name)
            _check(isinstance(value, int) and value >= 1, f"train.{name}", value, "must be a positive integer")
        _check(t.lr > 0, "train.lr", t.lr, "must be positive")
        _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
        _check(0 <= t.warmup_frac < 1, "train.warmup_frac", t.warmup_frac, "must be in [0, 1)")
        _check(0 <= t.dense_warmup_frac < 1, "train.dense_warmup_frac", t.dense_warmup_frac, "must be in [0, 1)")
        _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", t.betas,
               "must be two numbers in [0, 1)")
        _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 disables clipping)")
        _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
        m = self.model
        if t.dense_warmup_frac > 0:
            _check(m.moe.d_ff in (None, m.d_ff), "model.moe.d_ff", m.moe.d_ff,
                   f"the dense warm-up copies the dense FFN into every expert, so experts need d_ff={m.d_ff} "
                   "(or set train.dense_warmup_frac=0)")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["train"]["betas"] = list(self.train.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        cfg = _from_dict(cls, data, "")
        cfg.train.betas = tuple(cfg.train.betas)
        cfg.validate()
        return cfg


def load_config(path: str, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config and apply ``section.field=value`` overrides (values parsed as YAML)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"invalid override {item!r}: expected section.field=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"invalid override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return RunConfig.from_dict(data)


def save_config(cfg: RunConfig, path: str) -> None:
    """Write ``cfg`` as YAML atomically."""
    import yaml

    from .atomic import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def validate_moe(moe: MoEConfig, prefix: str = "moe", kinds=FFN_KINDS) -> None:
    """Check an MoE config; raise :class:`ConfigError` naming ``prefix.field``.

    Constraints between fields (top_k <= num_experts, ...) are checked for the FFN ``kinds`` in use.
    """
    E = moe.num_experts
    _check(isinstance(E, int) and E >= 1, f"{prefix}.num_experts", E, "must be a positive integer")
    if moe.d_ff is not None:
        _check(isinstance(moe.d_ff, int) and moe.d_ff >= 1, f"{prefix}.d_ff", moe.d_ff,
               "must be a positive integer or null")
    _check(moe.balance_coef >= 0, f"{prefix}.balance_coef", moe.balance_coef, "must be >= 0")
    _check(moe.z_loss_coef >= 0, f"{prefix}.z_loss_coef", moe.z_loss_coef, "must be >= 0")
    _check(moe.dispatch in DISPATCH_IMPLS, f"{prefix}.dispatch", moe.dispatch,
           f"choose one of {', '.join(DISPATCH_IMPLS)}")
    lory = moe.lory
    _check(isinstance(lory.segment_len, int) and lory.segment_len >= 1, f"{prefix}.lory.segment_len",
           lory.segment_len, "segment length T must be an integer >= 1")
    _check(lory.first_segment in LORY_FIRST_SEGMENT, f"{prefix}.lory.first_segment", lory.first_segment,
           f"choose one of {', '.join(LORY_FIRST_SEGMENT)}")
    _check(lory.routing in LORY_ROUTING, f"{prefix}.lory.routing", lory.routing,
           f"choose one of {', '.join(LORY_ROUTING)}")
    topk = moe.topk
    _check(isinstance(topk.top_k, int) and topk.top_k >= 1, f"{prefix}.topk.top_k", topk.top_k,
           "must be a positive integer")
    if "topk" in kinds:
        _check(topk.top_k <= E, f"{prefix}.topk.top_k", topk.top_k, f"must be at most num_experts={E}")
    if "sparsemixer" in kinds:
        _check(E >= 2, f"{prefix}.num_experts", E, "SparseMixer-v2 routes to 2 experts and needs at least 2")
    if topk.capacity_factor is not None:
        _check(topk.capacity_factor > 0, f"{prefix}.topk.capacity_factor", topk.capacity_factor,
               "must be positive or null (dropless)")
    sm = moe.sparsemixer
    _check(sm.jitter_eps >= 0, f"{prefix}.sparsemixer.jitter_eps", sm.jitter_eps, "must be >= 0")
    _check(0 <= sm.input_jitter_eps < 1, f"{prefix}.sparsemixer.input_jitter_eps", sm.input_jitter_eps,
           "must be in [0, 1)")
    ec = moe.expert_choice
    _check(ec.capacity_factor > 0, f"{prefix}.expert_choice.capacity_factor", ec.capacity_factor,
           "must be positive")
    _check(ec.granularity in EC_GRANULARITY, f"{prefix}.expert_choice.granularity", ec.granularity,
           f"choose one of {', '.join(EC_GRANULARITY)}")
    _check(isinstance(ec.segment_len, int) and ec.segment_len >= 1, f"{prefix}.expert_choice.segment_len",
           ec.segment_len, "must be an integer >= 1")


def _from_dict(cls, data: Any, where: str):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys by their dotted path."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config: {where or 'the config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"invalid config: unknown field {name}; known: {', '.join(fields)}")
        sub = _SUBCONFIGS.get((cls, key))
        if sub is not None:
            value = _from_dict(sub, value, name)
        else:
            _check_type(fields[key], value, name)
        kwargs[key] = value
    return cls(**kwargs)


def _check_type(f: dataclasses.Field, value: Any, name: str) -> None:
    """Reject a value of the wrong type for a plain ``int | float | bool | str`` field (int is accepted
    for float); fields of other types are checked by ``validate``."""
    expected = {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type))
    if expected is None:
        return
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"invalid config: {name}={value!r}: expected {expected.__name__}")


_SUBCONFIGS = {
    (RunConfig, "model"): ModelConfig,
    (RunConfig, "data"): DataConfig,
    (RunConfig, "train"): TrainConfig,
    (ModelConfig, "moe"): MoEConfig,
    (MoEConfig, "lory"): LoryConfig,
    (MoEConfig, "topk"): TopKConfig,
    (MoEConfig, "sparsemixer"): SparseMixerConfig,
    (MoEConfig, "expert_choice"): ExpertChoiceConfig,
}
