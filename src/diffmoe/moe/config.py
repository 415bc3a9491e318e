"""The ``moe`` section of a model config: the fields every family shares, and the config of each family
the model uses, read and written as ``moe.<kind>`` (in YAML ``moe: {lory: {segment_len: 256}}``; in
Python ``cfg.moe.families["lory"]``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .. import schema
from ..schema import ConfigError, check, positive_int
from .dispatch import DISPATCH_IMPLS
from .registry import FAMILIES


@dataclass
class MoEConfig:
    """The fields every MoE family shares, and the config of each family in use.

    ``MoEConfig(num_experts=8, families={"lory": LoryConfig(segment_len=64)})``; a family missing from
    ``families`` has its defaults (:meth:`family`). A model config keeps (and writes) the families its
    layers use.
    """

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
    families: dict[str, Any] = field(default_factory=dict)
    """kind -> that family's config dataclass, written to YAML as the section ``moe.<kind>``."""

    def family(self, kind: str) -> Any:
        """The config of family ``kind``: the one in :attr:`families`, else its defaults (None for a family
        without a config)."""
        if kind in self.families:
            return self.families[kind]
        config = FAMILIES[kind].config if kind in FAMILIES else None
        return config() if config is not None else None

    def in_use(self, kinds) -> "MoEConfig":
        """A copy whose :attr:`families` are exactly the configured families among ``kinds``."""
        used = [k for k in dict.fromkeys(kinds) if k in FAMILIES and FAMILIES[k].config is not None]
        return dataclasses.replace(self, families={kind: self.family(kind) for kind in used})

    # ------------------------------------------------------------------------------------------
    def validate(self, prefix: str = "moe", kinds=()) -> None:
        """Check every field and every family's sub-config; raise :class:`ConfigError` naming
        ``prefix.field``. Constraints between a family and the shared fields (top_k <= num_experts, ...)
        are checked for the FFN ``kinds`` in use."""
        E = self.num_experts
        check(positive_int(E), f"{prefix}.num_experts", E, "must be a positive integer")
        if self.d_ff is not None:
            check(positive_int(self.d_ff), f"{prefix}.d_ff", self.d_ff, "must be a positive integer or null")
        check(self.balance_coef >= 0, f"{prefix}.balance_coef", self.balance_coef, "must be >= 0")
        check(self.z_loss_coef >= 0, f"{prefix}.z_loss_coef", self.z_loss_coef, "must be >= 0")
        check(
            self.dispatch in DISPATCH_IMPLS,
            f"{prefix}.dispatch",
            self.dispatch,
            f"choose one of {', '.join(DISPATCH_IMPLS)}",
        )
        shared = {f.name for f in dataclasses.fields(self)}
        used = [kind for kind in kinds if kind in FAMILIES and FAMILIES[kind].config is not None]
        for kind in dict.fromkeys([*self.families, *used]):
            config, family = self.family(kind), FAMILIES.get(kind)
            check(
                kind not in shared,
                "ffn",
                kind,
                "this FFN kind is also the name of a moe field; register it under another name",
            )
            if family is None or family.config is None:
                raise ConfigError(f"invalid config: unknown field {prefix}.{kind}; known: {', '.join(self._known())}")
            check(isinstance(config, family.config), f"{prefix}.{kind}", config, f"must be a {family.config.__name__}")
            try:
                config.validate(E if kind in kinds else None)
            except ConfigError as err:
                raise err.within(prefix if err.field in shared else f"{prefix}.{kind}") from None

    def check_training(self, context_len: int, kinds, prefix: str = "moe") -> list[str]:
        """Refuse, for training on sequences of ``context_len`` positions, what the FFN ``kinds`` in use
        would compute with a leak of the future or could not learn from (:class:`ConfigError` naming
        ``prefix.kind.field``); return warnings about choices that stay allowed for experiments. A family
        config opts in by defining ``check_training(context_len) -> list[str]``."""
        warnings = []
        for kind in dict.fromkeys(kinds):
            checker = getattr(self.family(kind), "check_training", None)
            if checker is None:
                continue
            try:
                warnings += [f"{prefix}.{kind}.{message}" for message in checker(context_len)]
            except ConfigError as err:
                raise err.within(f"{prefix}.{kind}") from None
        return warnings

    def to_dict(self) -> dict:
        data = schema.fields_dict(self)
        data.pop("families")
        return {**data, **{kind: schema.fields_dict(config) for kind, config in self.families.items()}}

    @classmethod
    def from_dict(cls, data: Any, where: str = "moe") -> "MoEConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"invalid config: {where} must be a mapping, got {type(data).__name__}")
        shared = {f.name for f in dataclasses.fields(cls)} - {"families"}
        families = {}
        for key, value in data.items():
            family = FAMILIES.get(key)
            if key in shared:
                continue
            if family is None or family.config is None:
                raise ConfigError(f"invalid config: unknown field {where}.{key}; known: {', '.join(cls._known())}")
            families[key] = schema.build(family.config, value, f"{where}.{key}")
        cfg = schema.build(cls, {k: v for k, v in data.items() if k in shared}, where)
        cfg.families.update(families)
        return cfg

    @classmethod
    def _known(cls) -> list[str]:
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "families"]
        return fields + [kind for kind, family in FAMILIES.items() if family.config is not None]
