"""Weight import: HF BertModel, timm ViT (inflated), HF / original TimeSformer, BLIP / ALPRO.

Files are read without executing anything in them (safetensors, or torch pickles through
:func:`megavid.engine.checkpoint.safe_load`: tensors and plain data only). Every load is strict:
tensors are converted to our keys by the family's ``checkpoint_filter_fn``, then

- a shape mismatch raises :class:`CheckpointError` naming the first mismatched keys (and
  counting the rest);
- missing keys raise unless they match the caller's ``allow_missing`` prefixes (layers that are
  new by design, e.g. the cross-attention of fusion layers initialised from a plain BERT);
- unexpected keys raise unless ``strict=False``.

Whatever is tolerated is returned in a :class:`LoadReport` and logged; nothing ever falls back
to random initialisation silently.

``model.text_weights`` / ``model.video_weights`` (and ``data.tokenizer``) may also be Hugging
Face model names (``bert-base-uncased``, ``org/name``; for the video tower a timm name such as
``vit_base_patch16_224.augreg_in21k`` too): :func:`resolve_weights` finds them in the Hugging
Face cache (huggingface_hub's own lookup), downloading them unless ``HF_HUB_OFFLINE`` /
``TRANSFORMERS_OFFLINE`` is set. A path that exists is always a path.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megavid.errors import CheckpointError, MegavidError

log = logging.getLogger(__name__)

# Files looked for, in order, when a folder is given (HF layout); the first two are what a
# Hugging Face model repository holds.
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
# Wrappers some trainers put around the tensors.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state")


@dataclass
class LoadReport:
    """What a load did.

    Attributes:
        loaded: keys copied into the module.
        missing: module keys the checkpoint did not provide (left at their init).
        unexpected: checkpoint keys the module has no place for (ignored).
        ignored: checkpoint keys dropped on purpose (momentum encoders, queues, MLM heads).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing (kept at init: {_short(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({_short(self.unexpected)})")
        if self.ignored:
            parts.append(f"{len(self.ignored)} ignored")
        return "; ".join(parts)


_NAMED = 6  # keys named in a message; the rest are counted


def _short(keys: list[str], n: int = _NAMED) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


# --------------------------------------------------------------------------------------------
# Names on the Hugging Face Hub
# --------------------------------------------------------------------------------------------
# `name` or `org/name` (the Hub's repository ids; timm names have dots); a value ending like a
# weights file is a path that is missing, not a name.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".pkl")
"""Suffixes of weights files."""


def is_hub_name(value: str) -> bool:
    """Whether a config value that is not an existing path reads as a Hub model name."""
    return (not Path(value).expanduser().exists() and _HUB_NAME.fullmatch(value) is not None
            and not value.endswith(WEIGHT_FILE_SUFFIXES))


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set (read now, not at import)."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    huggingface_hub's default (read now: huggingface_hub reads the environment once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_fetch(
    repo_id: str,
    filenames: tuple[str, ...],
    *,
    key: str,
    value: str,
    snapshot: bool = False,
    error: type[MegavidError] = CheckpointError,
) -> Path:
    """Files of a Hub model repository from the Hugging Face cache, downloaded when not offline.

    Args:
        repo_id: the repository (``org/name`` or ``name``).
        filenames: alternatives, in order of preference (``snapshot=False``: the first one the
            repository has is returned), or the files to fetch together (``snapshot=True``:
            the snapshot folder holding them is returned).
        key: the config key that named it, for messages.
        value: the value the user gave (a timm name differs from its repository).
        snapshot: fetch every one of ``filenames`` present and return their folder.
        error: the error class to raise.

    Raises:
        error: one line naming the fix (fetch it on a machine with network, or a local path).
    """
    import huggingface_hub as hub
    from huggingface_hub import errors as hub_errors

    offline, cache = hub_offline(), hub_cache_dir()
    where = f"{key}={value!r}" + (f" (Hugging Face repository {repo_id})" if repo_id != value else "")
    absent = 0  # alternatives the repository itself does not have
    try:
        if snapshot:
            return Path(hub.snapshot_download(repo_id, allow_patterns=list(filenames), cache_dir=cache,
                                              local_files_only=offline))
        for name in filenames:
            try:
                return Path(hub.hf_hub_download(repo_id, name, cache_dir=cache, local_files_only=offline))
            except hub_errors.LocalEntryNotFoundError:
                continue  # not cached, and offline or no network: another one may be cached
            except hub_errors.EntryNotFoundError:
                absent += 1
    except hub_errors.RepositoryNotFoundError:  # also a gated or private repository
        raise error(f"{where} is not a file and not a Hugging Face model that can be fetched "
                    "(no such repository, or a gated one: log in with `hf auth login`); check "
                    "the name, or pass a local folder") from None
    except hub_errors.HFValidationError as e:
        raise error(f"{where} is not a file and not a valid Hugging Face model name "
                    f"({str(e).splitlines()[0]}); pass a local path") from None
    except (hub_errors.LocalEntryNotFoundError, OSError):
        pass  # not cached, and offline or no network (or the cache is unreadable)
    if absent == len(filenames):
        raise error(f"{where}: the Hugging Face repository has none of {', '.join(filenames)}; "
                    "download its weights file yourself and pass its path")
    how = "unset HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE" if offline else "check the network"
    raise error(f"{where} is not a file and not in the Hugging Face cache (HF_HUB_CACHE={cache}); "
                f"fetch it on a machine with network: hf download {repo_id} (or {how}), "
                "or pass a local folder")


def timm_hub_repo(name: str) -> str | None:
    """The Hugging Face repository timm loads a pretrained model name's weights from
    (``vit_base_patch16_224.augreg_in21k`` -> ``timm/vit_base_patch16_224.augreg_in21k``);
    None when timm does not know the name or keeps its weights elsewhere."""
    if "/" in name:
        return None
    try:
        from timm.models import get_pretrained_cfg
    except ImportError:
        return None
    cfg = get_pretrained_cfg(name)
    return cfg.hf_hub_id.split("@")[0] if cfg is not None and cfg.hf_hub_id else None


def resolve_weights(value: str, key: str, *, timm_names: bool = False) -> Path:
    """The weights a config value names: a path that exists (always a path), else a Hugging
    Face model name fetched into (or found in) the Hugging Face cache.

    Args:
        value: the config value.
        key: the config key, for messages (``model.text_weights``).
        timm_names: also take timm model names (``vit_base_patch16_224.augreg_in21k``: the
            ``timm/`` repository timm itself would load).

    Returns:
        The path, or the cached weights file (``model.safetensors`` or ``pytorch_model.bin``).
    """
    if not is_hub_name(value):
        return Path(value).expanduser()
    repo = (timm_hub_repo(value) if timm_names else None) or value
    return hub_fetch(repo, _FOLDER_FILES[:2], key=key, value=value)


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from a folder (HF layout), a ``.safetensors`` file or a torch pickle.

    Args:
        path: folder holding ``model.safetensors``/``pytorch_model.bin``, or a file.
    """
    p = Path(path)
    if p.is_dir():
        for name in _FOLDER_FILES:
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise CheckpointError(
                f"no weights in folder {path} (looked for {', '.join(_FOLDER_FILES)}); "
                "point to the weights file itself"
            )
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; check the path in the model config")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p))
        else:
            from megavid.engine.checkpoint import safe_load

            sd = safe_load(p)  # never unpickles anything but tensors and plain data
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}: {first[:240]}") from None
    for _ in range(2):  # e.g. {"model": {"module": {...}}}
        if isinstance(sd, dict):
            for k in _WRAPPER_KEYS:
                if k in sd and isinstance(sd[k], dict):
                    sd = sd[k]
                    break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{p} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------
def load_converted(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str = "<state dict>",
    allow_missing: tuple[str, ...] = (),
    strict: bool = True,
    ignored: list[str] | None = None,
) -> LoadReport:
    """Copy already-converted tensors into ``module`` with strict checks.

    Args:
        module: target module.
        state_dict: tensors under ``module``'s key names.
        source: name of the checkpoint for messages.
        allow_missing: key prefixes that may be absent (new by design).
        strict: raise on unexpected keys (missing keys outside ``allow_missing`` always raise).
        ignored: keys dropped on purpose by the converter (reported, never an error).
    """
    target = module.state_dict()
    report = LoadReport(source=source, ignored=list(ignored or []))
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state_dict.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if mismatched:
        more = f"; and {len(mismatched) - _NAMED} more" if len(mismatched) > _NAMED else ""
        raise CheckpointError(
            f"{source} does not fit the model: {len(mismatched)} tensors have other shapes "
            f"({'; '.join(mismatched[:_NAMED])}{more}); set the model config to the checkpoint's sizes"
        )
    report.missing = sorted(k for k in target if k not in state_dict)
    report.unexpected = sorted(k for k in state_dict if k not in target)
    bad_missing = [k for k in report.missing if not k.startswith(allow_missing)]
    if bad_missing:
        raise CheckpointError(
            f"{source} lacks {len(bad_missing)} tensors the model needs ({_short(bad_missing)}); "
            "is it the right checkpoint for this model config?"
        )
    if report.unexpected and strict:
        raise CheckpointError(
            f"{source} has {len(report.unexpected)} tensors the model has no place for "
            f"({_short(report.unexpected)}); use a matching model config (e.g. more layers) "
            "or load with strict=False to drop them"
        )
    with torch.no_grad():
        for k, v in state_dict.items():
            if k in target:
                target[k].copy_(v.to(target[k].dtype))
                report.loaded.append(k)
    log.info("%s", report.summary())
    return report


def load_bert_into(
    text_encoder: nn.Module, path_or_state: str | os.PathLike | dict[str, torch.Tensor], *, strict: bool = True
) -> LoadReport:
    """Load an HF ``BertModel`` checkpoint (bert-base-uncased format) into the text tower.

    The cross-attention of fusion layers is new by design when the checkpoint is a plain BERT:
    it may be missing (reported, kept at init), and so may the pooler (BertModel built without
    a pooling layer, BLIP-style). Everything else must match.

    Args:
        text_encoder: a :class:`~megavid.models.bert.BertTextFusion`.
        path_or_state: folder / ``.safetensors`` / ``.bin`` file, or HF-format tensors.
        strict: raise on checkpoint tensors the model has no place for (e.g. extra layers).
    """
    from megavid.models.bert import BERT_IGNORED_PREFIXES, POOLER_KEYS, checkpoint_filter_fn

    sd, source = _source(path_or_state)
    ignored = [k for k in sd if k.removeprefix("bert.").startswith(BERT_IGNORED_PREFIXES)]
    return load_converted(
        text_encoder, checkpoint_filter_fn(sd, text_encoder), source=source,
        allow_missing=_cross_prefixes(text_encoder) + POOLER_KEYS, strict=strict, ignored=ignored,
    )


def load_video_into(
    video_encoder: nn.Module,
    path_or_state: str | os.PathLike | dict[str, torch.Tensor],
    video_cfg: Any = None,
    *,
    strict: bool = True,
) -> LoadReport:
    """Load a timm ViT (inflated), HF ``TimesformerModel`` or original TimeSformer checkpoint.

    Position embeddings are resized to the model's image size and time embeddings to its frame
    count; an image ViT is inflated (temporal branch copied from the spatial one, zero
    temporal_fc).

    Args:
        video_encoder: a :class:`~megavid.models.timesformer.TimeSformer`.
        path_or_state: checkpoint file/folder or tensors.
        video_cfg: unused (the module carries its sizes); accepted for the task's call.
        strict: raise on unexpected tensors.
    """
    from megavid.models.timesformer import checkpoint_filter_fn

    sd, source = _source(path_or_state)
    return load_converted(video_encoder, checkpoint_filter_fn(sd, video_encoder), source=source, strict=strict)


# BLIP / ALPRO top-level keys that have no counterpart (prompts, the retrieval index queue).
_BLIP_ALWAYS_IGNORED = ("idx_queue", "prompter.", "prompts")
# Momentum towers and feature queues: loaded when the model has model.momentum > 0.
_BLIP_MOMENTUM = ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.")
_BLIP_QUEUES = {"image_queue": "video_queue", "video_queue": "video_queue", "text_queue": "text_queue",
                "queue_ptr": "queue_ptr"}
_BLIP_IGNORED = _BLIP_ALWAYS_IGNORED + _BLIP_MOMENTUM + tuple(_BLIP_QUEUES)
_BLIP_HEADS = {"itm_head.": "vtm_head.", "vision_proj.": "vision_proj.", "text_proj.": "text_proj.",
               "temp": "temp"}
_MLM_MAP = {
    "cls.predictions.transform.dense.": "mlm_head.dense.",
    "cls.predictions.transform.LayerNorm.": "mlm_head.norm.",
    "cls.predictions.bias": "mlm_head.bias",
}


def convert_blip_alpro(state_dict: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Convert a BLIP-style (``visual_encoder`` + ``text_encoder``) or ALPRO checkpoint to VideoLM keys.

    Returns (converted tensors, keys dropped on purpose).

    Args:
        state_dict: source tensors.
        model: the target :class:`~megavid.models.videolm.VideoLM`.
    """
    from megavid.models import bert, timesformer

    if getattr(model, "momentum", 0.0) > 0:
        return _convert_blip_momentum(state_dict, model)
    visual, text, out, ignored = {}, {}, {}, []
    for k, v in state_dict.items():
        if k.startswith(_BLIP_IGNORED):
            ignored.append(k)
        elif k.startswith("visual_encoder."):
            visual[k[len("visual_encoder."):]] = v
        elif k.startswith("text_encoder."):
            kk = k[len("text_encoder."):]
            for src, dst in _MLM_MAP.items():
                if kk.startswith(src):
                    out[dst + kk[len(src):]] = v
                    break
            else:
                if kk.startswith("cls."):
                    ignored.append(k)  # tied decoder weight / duplicate decoder bias
                else:
                    text[kk] = v
        else:
            for src, dst in _BLIP_HEADS.items():
                if k.startswith(src):
                    out[dst + k[len(src):]] = v
                    break
            else:
                out[k] = v  # reported as unexpected by the loader
    if "temp" in out and out["temp"].numel() == 1:
        out["temp"] = out["temp"].reshape(model.temp.shape)  # BLIP/ALPRO store a 0-dim scalar
    out.update({f"video_encoder.{k}": v for k, v in timesformer.checkpoint_filter_fn(visual, model.video_encoder).items()})
    out.update({f"text_encoder.{k}": v for k, v in bert.checkpoint_filter_fn(text).items()})
    ignored += [f"text_encoder.{k}" for k in text if k.removeprefix("bert.").startswith(bert.BERT_IGNORED_PREFIXES)]
    return out, ignored


def _convert_blip_momentum(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """BLIP/ALBEF conversion for a model with momentum towers: the ``*_m`` towers convert like
    the online ones (same filters) and the queues load when their size matches the model's."""
    online = {k: v for k, v in state_dict.items() if not k.startswith(_BLIP_MOMENTUM) and k not in _BLIP_QUEUES}
    out, ignored = convert_blip_alpro(online, _NoMomentum(model))
    momentum = {k.replace("_m.", ".", 1): v for k, v in state_dict.items() if k.startswith(_BLIP_MOMENTUM)}
    if momentum:
        conv_m, ign_m = convert_blip_alpro(momentum, _NoMomentum(model))
        renames = {"video_encoder.": "video_encoder_m.", "text_encoder.": "text_encoder_m.",
                   "vision_proj.": "vision_proj_m.", "text_proj.": "text_proj_m."}
        for k, v in conv_m.items():
            for src, dst in renames.items():
                if k.startswith(src):
                    out[dst + k[len(src):]] = v
                    break
            else:
                ignored.append(f"momentum:{k}")  # e.g. a momentum MLM head: no counterpart
        ignored += [k.replace(".", "_m.", 1) for k in ign_m]
    for src, dst in _BLIP_QUEUES.items():
        if src not in state_dict:
            continue
        v = state_dict[src]
        if src == "queue_ptr":
            out[dst] = v.reshape(1).long()
        elif tuple(v.shape) == tuple(getattr(model, dst).shape):
            out[dst] = v
        else:
            # The queue length is a training choice (BLIP: 57600): another size starts afresh.
            log.info("%s %s does not fit model.queue_size=%d: kept at init", src, tuple(v.shape), model.queue_size)
            ignored.append(src)
    if "queue_ptr" in out and any(s in ignored for s in ("image_queue", "video_queue", "text_queue")):
        del out["queue_ptr"]
        ignored.append("queue_ptr")
    return out, ignored


class _NoMomentum:
    """View of a VideoLM for the online conversion (``momentum`` reads 0)."""

    momentum = 0.0

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def read_blip_alpro(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The tensors of ``path`` when it is a BLIP/ALPRO pretraining checkpoint (keys under
    ``visual_encoder.`` and ``text_encoder.``), else None (a megavid checkpoint or export, or a
    DeepSpeed folder, which :func:`megavid.tasks.base.load_model_weights` reads)."""
    p = Path(path)
    if p.is_dir() and not any((p / name).is_file() for name in _FOLDER_FILES):
        return None  # a run directory or DeepSpeed checkpoint folder
    sd = read_state_dict(p)
    keys = list(sd)
    if any(k.startswith("visual_encoder.") for k in keys) and any(k.startswith("text_encoder.") for k in keys):
        return sd
    return None


def load_blip_alpro_into(
    model: nn.Module, path_or_state: str | os.PathLike | dict[str, torch.Tensor], *, strict: bool = True
) -> LoadReport:
    """Load a BLIP/ALPRO pretraining checkpoint into a VideoLM (QA head, if any, stays at init).

    Args:
        model: a :class:`~megavid.models.videolm.VideoLM`.
        path_or_state: checkpoint file or tensors.
        strict: raise on unexpected tensors.
    """
    from megavid.models.bert import POOLER_KEYS

    sd, source = _source(path_or_state)
    converted, ignored = convert_blip_alpro(sd, model)
    # BLIP/ALPRO text encoders are built without BERT's pooling layer
    allow: tuple[str, ...] = ("qa_head.", *(f"{tower}.{k}" for tower in ("text_encoder", "text_encoder_m")
                                            for k in POOLER_KEYS))
    momentum_missing = getattr(model, "momentum", 0.0) > 0 and not any(k.startswith(_BLIP_MOMENTUM) for k in sd)
    if getattr(model, "momentum", 0.0) > 0:
        # queues are transient training state; ALPRO checkpoints have no momentum towers at all
        allow += ("video_queue", "text_queue", "queue_ptr")
        if momentum_missing:
            allow += tuple(f"{m}." for m in ("video_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m"))
    report = load_converted(model, converted, source=source, allow_missing=allow, strict=strict, ignored=ignored)
    if momentum_missing:
        # ALBEF's copy_params: the momentum towers start as the loaded online ones.
        with torch.no_grad():
            for name in ("video_encoder", "text_encoder", "vision_proj", "text_proj"):
                for p, p_m in zip(getattr(model, name).parameters(), getattr(model, f"{name}_m").parameters()):
                    p_m.copy_(p)
        log.info("%s has no momentum towers: copied from the loaded online weights", source)
    return report


def _source(path_or_state: Any) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(path_or_state, dict):
        return path_or_state, "<state dict>"
    return read_state_dict(path_or_state), str(path_or_state)


def _cross_prefixes(text_encoder: nn.Module) -> tuple[str, ...]:
    n = getattr(text_encoder, "num_text_layers", 0)
    layers = getattr(text_encoder, "layers", [])
    return tuple(
        p for i in range(n, len(layers)) for p in (f"layers.{i}.cross_attn.", f"layers.{i}.cross_norm.")
    )
