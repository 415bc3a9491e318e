"""The ``moe`` section of a model config: the fields every family shares, and one sub-config per
registered family, read and written as ``moe.<kind>`` (``moe.lory.segment_len``, in YAML
``moe: {lory: {segment_len: 256}}``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .. import schema
from ..schema import ConfigError, check, positive_int
from .dispatch import DISPATCH_IMPLS
from .registry import FAMILIES


@dataclass(init=False)
class MoEConfig:
    """Shared by every MoE layer kind; each kind also reads its own sub-config ``moe.<kind>``.

    ``MoEConfig(num_experts=8, lory=LoryConfig(segment_len=64))``: the shared fields by position or
    name, a family's sub-config by its kind (or all of them in ``families``); families not given get
    their defaults.
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
    """kind -> that family's config; a registered family missing here gets its defaults. Reached as
    attributes (``moe.lory``) and written to YAML as ``moe.<kind>`` sections."""

    def __init__(self, *args: Any, families: dict[str, Any] | None = None, **options: Any):
        shared = [f for f in dataclasses.fields(self) if f.name != "families"]
        if len(args) > len(shared):
            raise TypeError(f"MoEConfig takes at most {len(shared)} positional arguments, got {len(args)}")
        given = {f.name: value for f, value in zip(shared, args)}
        for f in shared:
            if f.name in options:
                if f.name in given:
                    raise TypeError(f"MoEConfig got multiple values for argument {f.name!r}")
                given[f.name] = options.pop(f.name)
        unknown = [name for name in options if name not in FAMILIES]
        if unknown:
            raise TypeError(f"MoEConfig got unexpected keyword arguments {unknown}; fields: "
                            f"{', '.join(self._known())}")
        object.__setattr__(self, "families", {**(families or {}), **options})
        for f in shared:
            setattr(self, f.name, given.get(f.name, f.default))
        taken = {f.name for f in dataclasses.fields(self)}
        for kind in FAMILIES:
            check(kind not in taken and not hasattr(type(self), kind), "ffn", kind,
                  "this FFN kind is also the name of a moe field or method; register it under another name")
            getattr(self, kind, None)  # materialise the defaults of every registered family

    def __getattr__(self, name: str) -> Any:
        """A family's sub-config by its kind (only called when ordinary lookup fails)."""
        families = self.__dict__.get("families")
        family = FAMILIES.get(name)
        if families is not None and name not in families and family is not None and family.config is not None:
            families[name] = family.config()
        if families is not None and name in families:
            return families[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        family = FAMILIES.get(name)
        if family is not None and family.config is not None:
            self.families[name] = value
        else:
            super().__setattr__(name, value)

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
        check(self.dispatch in DISPATCH_IMPLS, f"{prefix}.dispatch", self.dispatch,
              f"choose one of {', '.join(DISPATCH_IMPLS)}")
        shared = {f.name for f in dataclasses.fields(self)}
        for kind, config in self.families.items():
            family = FAMILIES.get(kind)
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
            checker = getattr(self.families.get(kind), "check_training", None)
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
        for kind, family in FAMILIES.items():
            if family.config is not None:
                data[kind] = schema.fields_dict(getattr(self, kind))
        return data

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
