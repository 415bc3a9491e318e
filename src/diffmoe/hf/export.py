"""Export a diffmoe ``Decoder`` to a transformers checkpoint.

:func:`export_native` writes a checkpoint that loads with a *native* transformers class (no remote
code): ``llama``, ``mixtral``, ``qwen2_moe`` or ``phimoe`` (the latter in the widened residual stream of
:mod:`.phimoe`; needs transformers >= 5 to load). Each routing family declares which of these compute
its layers exactly, given its config (``Family.native``); a model is exported as the first architecture
that holds all of its layers (:func:`native_plan`). When none does, :func:`native_arch` returns None and
:func:`export_native` raises a ValueError naming the reason. An export computes the model's eval mode.

:func:`export_custom` writes any model whose families all declare an export class (``Family.remote``),
with custom code (loaded with ``trust_remote_code=True``): ``modeling_diffmoe.py`` is assembled from the
skeleton in ``diffmoe/hf/remote``, the shared blocks of :mod:`diffmoe.moe.remote` and the export class
of every family the model uses (:func:`modeling_source`), next to diffmoe's own state dict.
:func:`export_run` picks between the two.

The directory holds ``config.json`` (every field that changes a logit written explicitly, so no class
default and no transformers version changes the model), ``model.safetensors`` (legacy per-expert
names, read by transformers 4.57 and 5.x; the widened PhiMoE export needs 5.x),
``generation_config.json`` and, given a tokenizer, its ``tokenizer.json`` plus a hand-written ``tokenizer_config.json`` (``PreTrainedTokenizerFast``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import textwrap
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..moe import FAMILIES
from . import mapping, phimoe

FORMATS = ("auto", "native", "custom")
_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "phimoe": "PhimoeForCausalLM",
}


ARCHS = ("llama", "mixtral", "qwen2_moe", "phimoe")
"""The native architectures, in the order of preference when several compute a model."""


def native_plan(cfg: ModelConfig) -> tuple[str | None, dict, str]:
    """(arch, the ``config.json`` fields the layers' families set for it, "") for the first of :data:`ARCHS`
    that computes every layer of ``cfg`` exactly (each family says which do: its ``Family.native``), or
    (None, {}, why none does)."""
    offers: dict[str, dict[str, dict]] = {}
    for kind in dict.fromkeys(cfg.kinds):
        native = FAMILIES[kind].native
        archs = (
            native.archs(cfg.moe.family(kind))
            if native is not None
            else f"FFN kind {kind} has no native transformers class"
        )
        if isinstance(archs, str):
            return None, {}, f"{archs} (needs the custom-code export)"
        offers[kind] = archs
    common = [arch for arch in ARCHS if all(arch in archs for archs in offers.values())]
    if not common:
        narrow = min(offers, key=lambda kind: len(offers[kind]))
        others = ", ".join(kind for kind in offers if kind != narrow)
        return (
            None,
            {},
            (
                f"FFN kind {narrow} mixed with other kinds ({others}) has no native transformers class: "
                f"layers of kind {narrow} fit only {', '.join(offers[narrow])}, which cannot hold the "
                "others (needs the custom-code export)"
            ),
        )
    fields: dict = {}
    for archs in offers.values():
        fields.update(archs[common[0]])
    return common[0], fields, ""


def native_arch(cfg: ModelConfig) -> str | None:
    """``llama``, ``mixtral``, ``qwen2_moe`` or ``phimoe`` when a native transformers class computes exactly
    this model (``phimoe``: transformers >= 5); None otherwise."""
    return native_plan(cfg)[0]


def hf_config(cfg: ModelConfig, arch: str, eod_id: int) -> dict:
    """The ``config.json`` of ``cfg`` exported as ``arch``, every logit-relevant field explicit."""
    if arch not in _CLASSES:
        raise ValueError(f"unknown native architecture {arch!r}; choose one of {', '.join(_CLASSES)}")
    out = {
        "architectures": [_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": float(cfg.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "sliding_window": None,
        "use_cache": True,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "bos_token_id": eod_id,
        "eos_token_id": eod_id,
        "pad_token_id": eod_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if arch == "llama":
        out["pretraining_tp"] = 1
        return out
    planned, fields, why = native_plan(cfg)
    if planned != arch:
        raise ConfigError(f"cannot export natively as {arch}: " + (why or f"the model's layers make it {planned}"))
    moe = cfg.moe
    if arch == "phimoe":
        out.pop("mlp_bias")
        out.update(phimoe.config_fields(cfg))
    expert_ff = moe.d_ff or cfg.d_ff
    out.update(
        router_aux_loss_coef=moe.balance_coef / fields["num_experts_per_tok"], output_router_logits=False, **fields
    )
    if arch == "mixtral":
        out.update(num_local_experts=moe.num_experts, intermediate_size=expert_ff, router_jitter_noise=0.0)
    elif arch == "qwen2_moe":
        out.update(
            num_experts=moe.num_experts,
            mlp_only_layers=[i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)],
            decoder_sparse_step=1,
            moe_intermediate_size=expert_ff,
            shared_expert_intermediate_size=0,
            use_sliding_window=False,
            max_window_layers=cfg.n_layers,
            qkv_bias=False,
        )
    return out


def _tokenizer_files(tokenizer_dir: Path, eod_id: int) -> tuple[Path, dict, int]:
    """(tokenizer.json path, tokenizer_config.json content, BOS id) for a tokenizer dir (a prepared dataset
    or any directory holding a tokenizer.json). The BOS is the dataset's own when its manifest names one
    (a pretrained tokenizer's ``<s>``: the saved tokenizer.json puts it in front of a prompt), else the eod."""
    from tokenizers import Tokenizer

    from ..data.errors import DataError

    path = tokenizer_dir / "tokenizer.json" if tokenizer_dir.is_dir() else tokenizer_dir
    if not path.is_file():
        raise DataError(f"no tokenizer.json in {tokenizer_dir}")
    tokenizer = Tokenizer.from_file(str(path))
    eod = tokenizer.id_to_token(eod_id)
    if eod is None:
        raise DataError(f"{path}: the end-of-document id {eod_id} is not in the vocabulary")
    bos_id = eod_id
    manifest = path.parent / "manifest.json"
    if manifest.is_file():
        bos = json.loads(manifest.read_text(encoding="utf-8")).get("tokenizer", {}).get("bos_id")
        bos_id = bos if isinstance(bos, int) else eod_id
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.id_to_token(bos_id),
        "eos_token": eod,
        "pad_token": eod,
        "unk_token": eod,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    return path, config, bos_id


def _with_bos(config: dict, tok: tuple[Path, dict, int] | None) -> dict:
    """A model config with the dataset's BOS id (when the tokenizer files come along)."""
    return config if tok is None else {**config, "bos_token_id": tok[2]}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_generation_and_tokenizer(directory: Path, eod_id: int, tok: tuple[Path, dict, int] | None) -> None:
    """generation_config.json (greedy, eos = pad = eod, bos = the dataset's BOS or the eod) and, given one,
    the tokenizer files."""
    bos_id = tok[2] if tok is not None else eod_id
    _write_json(
        directory / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": eod_id, "pad_token_id": eod_id, "do_sample": False},
    )
    if tok is not None:
        shutil.copyfile(tok[0], directory / "tokenizer.json")
        _write_json(directory / "tokenizer_config.json", tok[1])


def _write_dir(out: Path, fill) -> Path:
    """Create the directory ``out`` complete or not at all: ``fill(tmp)`` writes it next to ``out``, then
    it is renamed (an existing ``out`` is replaced)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_native(model, out: str | os.PathLike, eod_id: int, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write ``model`` (a :class:`~diffmoe.model.Decoder`) to the directory ``out`` as a native transformers
    checkpoint. ``eod_id``: the end-of-document id (bos = eos = pad). ``tokenizer_dir``: a directory
    holding the tokenizer.json (e.g. the prepared dataset) to ship along. The directory appears
    complete or not at all (written next to ``out``, then renamed); an existing ``out`` is replaced.
    Raises ValueError when no native class computes the model exactly."""
    from safetensors.torch import save_file

    cfg = model.cfg
    arch, _, why = native_plan(cfg)
    if arch is None:
        raise ConfigError(f"cannot export natively: {why}")
    if not 0 <= eod_id < cfg.vocab_size:
        raise ConfigError(f"eod_id={eod_id} outside the vocabulary (vocab_size={cfg.vocab_size})")
    out = Path(out)
    tok = _tokenizer_files(Path(tokenizer_dir), eod_id) if tokenizer_dir is not None else None
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    moe_layers = {i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)}
    if arch == "phimoe":
        tensors = phimoe.to_phimoe(state, cfg)
    else:
        tensors = mapping.to_hf(state, arch, cfg.n_layers, moe_layers, cfg.tie_embeddings)

    def fill(tmp: Path) -> None:
        _write_json(tmp / "config.json", _with_bos(hf_config(cfg, arch, eod_id), tok))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_generation_and_tokenizer(tmp, eod_id, tok)

    return _write_dir(Path(out), fill)


REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_diffmoe.py", "modeling_diffmoe.py")


def remote_classes(cfg: ModelConfig) -> dict[str, type]:
    """FFN kind -> the export class of its family, for the kinds ``cfg`` uses; a ConfigError naming the kinds
    whose family declares none."""
    missing = [kind for kind in dict.fromkeys(cfg.kinds) if FAMILIES[kind].remote is None]
    if missing:
        raise ConfigError(
            f"cannot export with custom code: FFN kind(s) {', '.join(missing)} declare no export class (Family.remote)"
        )
    return {kind: FAMILIES[kind].remote for kind in dict.fromkeys(cfg.kinds)}


def modeling_source(cfg: ModelConfig) -> str:
    """The ``modeling_diffmoe.py`` of a custom-code export of ``cfg``: the skeleton, the shared blocks of
    :mod:`diffmoe.moe.remote`, the export class of each family in use, and ``FFN_CLASSES``."""
    from ..moe import remote

    used = remote_classes(cfg)
    classes = {kind: used[kind] for kind in FAMILIES if kind in used}  # registry order: one text per family set
    parts = [
        (REMOTE_DIR / "modeling_diffmoe.py").read_text(encoding="utf-8"),
        f"# ---- {remote.__name__} ----\n" + inspect.getsource(remote),
    ]
    for cls in dict.fromkeys(classes.values()):
        if cls.__module__ != remote.__name__:
            parts.append(f"# ---- {cls.__module__}.{cls.__qualname__} ----\n" + textwrap.dedent(inspect.getsource(cls)))
    table = ", ".join(f"{kind!r}: {cls.__name__}" for kind, cls in classes.items())
    parts.append(f"FFN_CLASSES = {{{table}}}\n")
    return "\n\n".join(part.rstrip() + "\n" for part in parts)


def configuration_source(modeling: str) -> str:
    """``configuration_diffmoe.py``, ending with the digest of the ``modeling`` code it ships with.

    transformers binds the first model class it loads for a config class to that class, and reuses it for
    later checkpoints whose config module is the same file (it caches modules by their text): exports with
    different modeling code (other families) must have different configuration files, or loading a second
    one in the same process builds the first one's model."""
    digest = hashlib.sha256(modeling.encode("utf-8")).hexdigest()
    text = (REMOTE_DIR / "configuration_diffmoe.py").read_text(encoding="utf-8")
    return text + f"\n# ships with modeling_diffmoe.py of sha256 {digest}\n"


def custom_config(cfg: ModelConfig, eod_id: int, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` of ``cfg`` exported with custom code: diffmoe's config dict under ``diffmoe``
    plus the mirrored transformers fields and the ``auto_map`` to the shipped files."""
    dtype_name = str(dtype).removeprefix("torch.")
    out = {
        "architectures": ["DiffMoEForCausalLM"],
        "model_type": "diffmoe",
        "auto_map": {
            "AutoConfig": "configuration_diffmoe.DiffMoEConfig",
            "AutoModelForCausalLM": "modeling_diffmoe.DiffMoEForCausalLM",
        },
        "diffmoe": cfg.to_dict(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "bos_token_id": eod_id,
        "eos_token_id": eod_id,
        "pad_token_id": eod_id,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    notes = [cls.note for cls in dict.fromkeys(remote_classes(cfg).values()) if cls.note]
    if notes:
        out["note"] = " ".join(notes)
    return out


def export_custom(model, out: str | os.PathLike, eod_id: int, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write ``model`` (a :class:`~diffmoe.model.Decoder`, any FFN kinds) to the directory ``out`` as a
    transformers checkpoint with custom code (load with ``trust_remote_code=True``): ``config.json``
    (:func:`custom_config`), ``configuration_diffmoe.py`` and the assembled ``modeling_diffmoe.py`` (:func:`modeling_source`), diffmoe's own state dict as
    ``model.safetensors`` (tied weights stored once), ``generation_config.json`` and the tokenizer
    files. Written complete or not at all, as :func:`export_native`."""
    from safetensors.torch import save_file

    from ..parallel.dcp import model_state

    cfg = model.cfg
    if not 0 <= eod_id < cfg.vocab_size:
        raise ConfigError(f"eod_id={eod_id} outside the vocabulary (vocab_size={cfg.vocab_size})")
    tok = _tokenizer_files(Path(tokenizer_dir), eod_id) if tokenizer_dir is not None else None
    modeling = modeling_source(cfg)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state(model).items()}
    dtype = model.embed.weight.dtype

    def fill(tmp: Path) -> None:
        _write_json(tmp / "config.json", _with_bos(custom_config(cfg, eod_id, dtype), tok))
        (tmp / "configuration_diffmoe.py").write_text(configuration_source(modeling), encoding="utf-8")
        (tmp / "modeling_diffmoe.py").write_text(modeling, encoding="utf-8")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_generation_and_tokenizer(tmp, eod_id, tok)

    return _write_dir(Path(out), fill)


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    eod_id: int | None = None,
    format: str = "auto",
) -> Path:
    """Export a training run's checkpoint (the newest unless ``checkpoint``) with its dataset's tokenizer.
    The eod id comes from the dataset manifest (``data.path``); pass ``eod_id`` when the dataset is gone.
    ``format``: ``native`` (:func:`export_native`; raises when no native class fits), ``custom``
    (:func:`export_custom`) or ``auto`` (native when :func:`native_arch` finds a class, else custom)."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    from ..data.errors import DataError
    from ..data.store import read_manifest
    from ..runs import load_run

    cfg, model, _ = load_run(run_dir, checkpoint)
    data = Path(cfg.data.primary_path)
    if not data.is_absolute() and not data.exists() and (Path(run_dir) / data).exists():
        data = Path(run_dir) / data
    tokenizer_dir = None
    try:
        manifest = read_manifest(data)
    except DataError:  # no dataset there any more: the caller may pass eod_id
        manifest = None
    if manifest is not None:
        tokenizer_dir = data / manifest["tokenizer"]["file"]
        if eod_id is None:
            eod_id = int(manifest["tokenizer"]["eod_id"])
    if eod_id is None:
        raise DataError(
            f"the end-of-document id is unknown: no prepared dataset at {data} (data.path of the run); pass eod_id"
        )
    if format == "custom" or (format == "auto" and native_arch(model.cfg) is None):
        return export_custom(model, out, eod_id, tokenizer_dir)
    return export_native(model, out, eod_id, tokenizer_dir)
