"""One dataclass tree for a run (model / data / train), with validation that names the offending field.

Every choice the papers leave open is a field here with a documented default; the ``model.moe``
section and each routing family's sub-config come from :mod:`diffmoe.moe` (its registry lists the FFN
kinds). Configs round-trip through plain dicts (and so YAML): ``ModelConfig.from_dict(cfg.to_dict()) == cfg``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import schema
from .moe import FAMILIES, MoEConfig, MoELayer
from .schema import ConfigError, check, positive_int

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
    "save_config",
]


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
    """The shared MoE fields and the config of every family the layers use (its defaults when not given;
    a family no layer uses is validated, then dropped)."""

    def __post_init__(self) -> None:
        self.validate()  # every family given, used or not
        self.moe = self.moe.in_use(self.kinds)

    # ----------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def layer_ffn(self, layer: int) -> str:
        return self.ffn if isinstance(self.ffn, str) else self.ffn[layer]

    @property
    def kinds(self) -> list[str]:
        """The FFN kinds in use (as given: ``ffn`` itself, or its list)."""
        return [self.ffn] if isinstance(self.ffn, str) else list(self.ffn)

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            check(positive_int(value), name, value, "must be a positive integer")
        check(self.d_model % self.n_heads == 0, "d_model", self.d_model, f"must be divisible by n_heads={self.n_heads}")
        check(
            self.head_dim % 2 == 0,
            "d_model",
            self.d_model,
            f"d_model / n_heads = {self.head_dim} must be even for rotary embeddings",
        )
        kv = self.kv_heads
        check(
            isinstance(kv, int) and kv >= 1 and self.n_heads % kv == 0,
            "n_kv_heads",
            self.n_kv_heads,
            f"must divide n_heads={self.n_heads}",
        )
        check(self.init_std > 0, "init_std", self.init_std, "must be positive")
        kinds = self.kinds
        if not isinstance(self.ffn, str):
            check(
                len(kinds) == self.n_layers,
                "ffn",
                self.ffn,
                f"a list must have one entry per layer (n_layers={self.n_layers})",
            )
        for kind in kinds:
            check(kind in FAMILIES, "ffn", kind, f"unknown FFN kind; choose one of {', '.join(FAMILIES)}")
        self.moe.validate(prefix="moe", kinds=kinds)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer``'s FFN is an MoE layer (router and experts)."""
        return issubclass(FAMILIES[self.layer_ffn(layer)].layer, MoELayer)

    @property
    def has_moe(self) -> bool:
        """Whether any layer's FFN is an MoE layer (the dense warm-up applies)."""
        return any(issubclass(FAMILIES[kind].layer, MoELayer) for kind in self.kinds)

    def to_dict(self) -> dict:
        return schema.fields_dict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> "ModelConfig":
        return schema.build(cls, data, where)


@dataclass
class DataConfig:
    """Where training data comes from: a directory written by ``diffmoe prepare``."""

    path: str = "data"
    batch_size: int = 8
    """The global batch: sequences per optimizer step, summed over all ranks and micro-batches. The same
    config means the same training on 1 or 64 ranks; gradient accumulation is derived from it."""
    micro_batch_size: int | None = None
    """Sequences per forward pass on one rank (None: batch_size / data-parallel ranks). Gradient
    accumulation = batch_size / (micro_batch_size x ranks), which must be a whole number."""
    eval_batches: int | None = 8
    """Periodic evaluation scores eval_batches x (micro_batch_size, else batch_size) evenly spaced
    held-out rows, whatever the number of ranks (None: the whole held-out split); per dataset of a mixture."""
    mixture: list[dict] | None = None
    """A weighted mixture of prepared datasets, used instead of ``path``: a list of ``{path, weight}`` (and
    an optional ``name``, the prefix of its evaluation keys), e.g. ``[{path: data/web, weight: 3}, {path:
    data/code, weight: 1}]``. Each global batch draws from the datasets by their weights, deterministically
    from (seed, step) and the same on any number of ranks; the datasets must share a tokenizer.
    See :mod:`diffmoe.data.mixture`."""

    @property
    def primary_path(self) -> str:
        """The dataset whose tokenizer, end-of-document id and context length the run uses (the first of a
        mixture, whose datasets all share them)."""
        return str(self.mixture[0]["path"]) if self.mixture else self.path


LOGGERS = ("jsonl", "tensorboard", "wandb")
"""What ``train.loggers`` may name (:mod:`diffmoe.train.loggers`)."""

DTYPES = ("float32", "bfloat16")
"""FSDP2 mixed-precision dtypes (float16 would need a gradient scaler, which diffmoe does not have)."""


@dataclass
class ParallelConfig:
    """How ranks share the work (``train.parallel``); any layout trains the same model on the same data.

    Every rank reads distinct data; the ranks of ``ep``/``etp`` groups are data-parallel ranks too.
    """

    mode: str = "ddp"
    """``ddp`` (every rank holds everything; small models) or ``fsdp`` (FSDP2: parameters, gradients
    and optimizer state sharded over ``dp_shard`` ranks). A single process runs unwrapped under ``ddp``."""
    dp_replicate: int = 1
    """fsdp: replicas of the sharded model (HSDP: shard within a replica, all-reduce across them)."""
    dp_shard: int = -1
    """fsdp: ranks one replica is sharded over (-1: world / dp_replicate)."""
    ep: int = 1
    """Expert parallelism (fsdp; families whose layers have ``expert_sharding == "ep"``: top-k,
    SparseMixer-v2): experts split over ``ep`` ranks, tokens exchanged all-to-all; the experts are
    FSDP-sharded over the remaining dp_shard / ep ranks."""
    etp: int = 1
    """Lory's sharded experts (fsdp; ``expert_sharding == "etp"``): ``etp`` ranks each hold the same d_ff
    slice of every expert and exchange activations; experts FSDP-sharded over dp_shard / etp."""
    activation_checkpointing: str = "none"
    """``none`` or ``block`` (recompute each transformer block in backward)."""
    param_dtype: str | None = None
    """fsdp: the dtype blocks compute in (None: bfloat16 with train.bf16, else float32)."""
    reduce_dtype: str | None = None
    """fsdp: the dtype gradients are reduced in (None: float32)."""
    timeout_s: float = 600.0
    """Process-group timeout: a collective that waits longer (a hung rank) ends the job."""

    def validate(self, model: ModelConfig) -> None:
        check(self.mode in ("ddp", "fsdp"), "mode", self.mode, "must be ddp or fsdp")
        for name in ("dp_replicate", "ep", "etp"):
            value = getattr(self, name)
            check(positive_int(value), name, value, "must be a positive integer")
        check(
            self.dp_shard == -1 or positive_int(self.dp_shard),
            "dp_shard",
            self.dp_shard,
            "must be a positive integer or -1 (the ranks left over)",
        )
        check(
            self.activation_checkpointing in ("none", "block"),
            "activation_checkpointing",
            self.activation_checkpointing,
            "must be none or block",
        )
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            check(value is None or value in DTYPES, name, value, f"must be one of {', '.join(DTYPES)} or null")
        check(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be positive")
        if self.mode == "ddp":
            for name in ("dp_replicate", "dp_shard", "ep", "etp"):
                value = getattr(self, name)
                check(
                    value in (1, -1) if name == "dp_shard" else value == 1,
                    name,
                    value,
                    "needs mode=fsdp (ddp replicates everything over every rank)",
                )
            check(
                self.param_dtype is None and self.reduce_dtype is None,
                "param_dtype" if self.param_dtype is not None else "reduce_dtype",
                self.param_dtype or self.reduce_dtype,
                "is an FSDP mixed-precision setting: needs mode=fsdp (ddp uses train.bf16 autocast)",
            )
        check(self.ep == 1 or self.etp == 1, "etp", self.etp, f"cannot combine with ep={self.ep}")
        moe = [(kind, FAMILIES[kind].layer) for kind in model.kinds if issubclass(FAMILIES[kind].layer, MoELayer)]
        for name in ("ep", "etp"):
            size = getattr(self, name)
            if size == 1:
                continue
            check(bool(moe), name, size, "the model has no MoE layer")
            for kind, layer in moe:
                check(
                    layer.expert_sharding == name,
                    name,
                    size,
                    f"layers of kind {kind!r} cannot shard their experts this way"
                    + (
                        f" (they support {layer.expert_sharding})"
                        if layer.expert_sharding
                        else " (they stay data parallel)"
                    ),
                )
        if self.ep > 1:
            check(
                model.moe.num_experts % self.ep == 0,
                "ep",
                self.ep,
                f"must divide model.moe.num_experts={model.moe.num_experts}",
            )
        if self.etp > 1:
            d_ff = model.moe.d_ff or model.d_ff
            check(d_ff % self.etp == 0, "etp", self.etp, f"must divide the experts' d_ff={d_ff}")

    def dtypes(self, bf16: bool) -> tuple[str, str]:
        """(param_dtype, reduce_dtype) with the defaults resolved."""
        return self.param_dtype or ("bfloat16" if bf16 else "float32"), self.reduce_dtype or "float32"


@dataclass
class TrainConfig:
    """The optimisation loop. Steps count optimizer updates (one global batch each)."""

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
    bf16: bool = False
    """bfloat16 compute (master weights stay float32): autocast, or FSDP2's mixed precision under
    ``parallel.mode=fsdp``."""
    compile: bool = False
    """Run the model's forward under ``torch.compile`` (``diffmoe bench model`` measures whether it pays;
    the first steps compile, which takes tens of seconds on CPU)."""
    seed: int = 0
    dense_warmup_frac: float = 0.0
    """Lory's dense warm-up: train a dense model for this fraction of the steps, then copy its FFN into
    every expert and continue as MoE (paper: 0.05). 0 disables it."""
    init_from: str | None = None
    """Start from the weights of a diffmoe run, checkpoint or ``diffmoe import`` directory (not its
    optimizer or step): the same model shape as it is, or a dense source into a model with MoE layers,
    copying each dense FFN into every expert (sparse upcycling). See :mod:`diffmoe.train.init`."""
    log_every: int = 10
    routing_log_every: int = 50
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    max_bad_steps: int = 10
    """A step whose loss or gradient is not finite is skipped; this many in a row stop the run."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Where records go: ``jsonl`` (metrics.jsonl; required: resume and diffmoe's tools read it),
    ``tensorboard``, ``wandb`` (the ``wandb`` extra; ``WANDB_MODE=offline`` keeps it local)."""
    tensorboard: bool = True
    """false leaves TensorBoard out even when ``loggers`` names it (the setting of configs from before
    ``loggers``)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def logger_names(self) -> list[str]:
        """The loggers in force: ``loggers`` less TensorBoard when ``tensorboard`` is false."""
        return [name for name in dict.fromkeys(self.loggers) if name != "tensorboard" or self.tensorboard]


@dataclass
class RunConfig:
    """Everything ``diffmoe train`` needs: ``model``, ``data`` and ``train`` sections of one YAML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.train.betas, list):
            self.train.betas = tuple(self.train.betas)
        self.validate()

    def validate(self) -> None:
        """The data and train sections, and what they require of the model (the model config validated
        itself when it was built, and is validated again when a model is built from it)."""
        d, t = self.data, self.train
        check(positive_int(d.batch_size), "data.batch_size", d.batch_size, "must be a positive integer")
        check(
            d.micro_batch_size is None or positive_int(d.micro_batch_size),
            "data.micro_batch_size",
            d.micro_batch_size,
            "must be a positive integer or null",
        )
        if d.micro_batch_size is not None:
            check(
                d.batch_size % d.micro_batch_size == 0,
                "data.micro_batch_size",
                d.micro_batch_size,
                f"must divide data.batch_size={d.batch_size}",
            )
        check(
            d.eval_batches is None or d.eval_batches >= 1,
            "data.eval_batches",
            d.eval_batches,
            "must be a positive integer or null",
        )
        if d.mixture is not None:
            from .data.mixture import check_mixture

            check_mixture(d.mixture)
        for name in (
            "steps",
            "log_every",
            "routing_log_every",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
            "max_bad_steps",
        ):
            value = getattr(t, name)
            check(isinstance(value, int) and value >= 1, f"train.{name}", value, "must be a positive integer")
        check(t.lr > 0, "train.lr", t.lr, "must be positive")
        check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
        check(0 <= t.warmup_frac < 1, "train.warmup_frac", t.warmup_frac, "must be in [0, 1)")
        check(0 <= t.dense_warmup_frac < 1, "train.dense_warmup_frac", t.dense_warmup_frac, "must be in [0, 1)")
        check(
            len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
            "train.betas",
            t.betas,
            "must be two numbers in [0, 1)",
        )
        check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 disables clipping)")
        check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
        check(
            isinstance(t.loggers, list) and all(name in LOGGERS for name in t.loggers),
            "train.loggers",
            t.loggers,
            f"must be a list of {', '.join(LOGGERS)}",
        )
        check(
            "jsonl" in t.loggers,
            "train.loggers",
            t.loggers,
            "must include jsonl (metrics.jsonl: resume, evaluation tools and the reproduction suite read it)",
        )
        if "wandb" in t.loggers:  # checked on every rank: a missing package must not stop rank 0 alone
            import importlib.util

            check(
                importlib.util.find_spec("wandb") is not None,
                "train.loggers",
                t.loggers,
                "names wandb, which is not installed: pip install 'diffmoe[wandb]'",
            )
        m = self.model
        try:
            t.parallel.validate(m)
        except ConfigError as err:
            raise err.within("train.parallel") from None
        if t.dense_warmup_frac > 0:
            check(
                m.moe.d_ff in (None, m.d_ff),
                "model.moe.d_ff",
                m.moe.d_ff,
                f"the dense warm-up copies the dense FFN into every expert, so experts need d_ff={m.d_ff} "
                "(or set train.dense_warmup_frac=0)",
            )

    def check_training(self, context_len: int) -> list[str]:
        """What only training on the data's ``context_len`` positions per sequence rules out (a config that
        leaks the future or whose router cannot learn: :class:`ConfigError`), beyond :meth:`validate`, which
        also holds for evaluating and generating with the model. Returns warnings to log (and record)."""
        return self.model.moe.check_training(context_len, self.model.kinds, "model.moe")

    def to_dict(self) -> dict:
        return schema.fields_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        train = data.get("train") if isinstance(data, dict) else None
        if isinstance(train, dict) and "grad_accum" in train:
            raise ConfigError(
                f"invalid config: train.grad_accum={train['grad_accum']!r}: removed; data.batch_size is "
                "now the global batch (sequences per optimizer step) and accumulation is derived "
                "from it: set data.batch_size to the old batch_size x grad_accum x ranks"
            )
        return schema.build(cls, data, "")


def load_config(path: str, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config and apply ``section.field=value`` overrides (values parsed as YAML)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"invalid override {item!r}: expected section.field=value")
        if not isinstance(data, dict):
            raise ConfigError(f"invalid config: {path} must be a mapping, got {type(data).__name__}")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"invalid override {item!r}: {part} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"invalid override {item!r}: the value is not valid YAML: {' '.join(str(err).split())}"
            ) from None
    return RunConfig.from_dict(data)


def save_config(cfg: RunConfig, path: str) -> None:
    """Write ``cfg`` as YAML atomically."""
    import yaml

    from .atomic import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
