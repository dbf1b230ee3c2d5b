"""The avatar checkpoint: what :meth:`DiffusionAvatarsModel.save_pretrained` writes and
:meth:`~DiffusionAvatarsModel.from_pretrained` reads, apart from the model that uses it.

Checkpoint directory (format 2)::

    config.json                          {"format": 2, "base_model": ..., "config": DiffusionAvatarsConfig,
                                          "sha256": {relative path: sha256 of every other file}}
    empty_prompt_embedding.safetensors
    <part>/config.json, <part>/diffusion_pytorch_model.safetensors

one folder per trainable part with parameters, each a diffusers model written by its own
``save_pretrained`` and read by its ``from_pretrained``: ``features`` (:class:`FeaturePlanes`),
``controlnet`` (``ControlNetModel``), ``expression_tokens``, ``expression_layers`` and, in the
"w/o LDM prior" ablation, ``unet`` (``UNet2DConditionModel``) and ``cond_embedding``. Format 1
(every trainable weight in one ``trainable.safetensors``, written before the parts were diffusers
models) still loads: its names are the model's parameter names, which have not changed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file

from avatars.base_model import EMPTY_PROMPT_FILE, EMPTY_PROMPT_KEY, load_empty_prompt_embedding, save_tensor_atomic
from avatars.configs import DiffusionAvatarsConfig
from avatars.models.conditioning import ConditioningEmbedding
from avatars.models.expression_attention import ExpressionAttentionLayers, ExpressionTokens
from avatars.models.feature_planes import FeaturePlanes
from common.fingerprint import check_sha256, folder_sha256
from common.io import atomic_directory

if TYPE_CHECKING:
    from avatars.models.diffusion_avatars import DiffusionAvatarsModel

CONFIG_FILE = "config.json"
#: The checkpoint format :meth:`DiffusionAvatarsModel.save_pretrained` writes.
FORMAT = 2
#: Format 1's single weights file.
WEIGHTS_FILE = "trainable.safetensors"
#: Trainable part (attribute and folder name) -> its diffusers model class.
PART_CLASSES: dict[str, type[ModelMixin]] = {
    "features": FeaturePlanes,
    "controlnet": ControlNetModel,
    "unet": UNet2DConditionModel,
    "cond_embedding": ConditioningEmbedding,
    "expression_tokens": ExpressionTokens,
    "expression_layers": ExpressionAttentionLayers,
}
#: Where each part sits in :class:`DiffusionAvatarsModel`: the prefix of its parameter names.
PART_PREFIXES = {name: ("conditioning.features." if name == "features" else f"{name}.") for name in PART_CLASSES}
PART_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
#: How a "w/o diffusion" checkpoint's single pass reads its output (``config.json`` key "single_pass"):
#: as the base's v-prediction at the last timestep (``DiffusionAvatarsModel.single_pass_latents``).
#: Such checkpoints written before that (no key) read it as the clean latent; they are refused, not
#: rendered with the wrong sign.
SINGLE_PASS_READING = "v_at_last_timestep"


def save_checkpoint(model: DiffusionAvatarsModel, directory: str | os.PathLike) -> None:
    """Writes ``model``'s checkpoint directory (module docstring) atomically: a temporary directory
    beside ``directory``, then renamed over it."""
    with atomic_directory(Path(directory)) as tmp:
        meta = {"format": FORMAT, "base_model": model.base_model, "config": model.config.to_dict()}
        if model.base_fingerprint is not None:
            meta["base_fingerprint"] = model.base_fingerprint
        if not model.config.use_diffusion:
            meta["single_pass"] = SINGLE_PASS_READING
        for name, part in model.parts().items():
            part.save_pretrained(tmp / name)
        save_tensor_atomic({EMPTY_PROMPT_KEY: model.empty_prompt_embedding}, tmp / EMPTY_PROMPT_FILE)
        meta["sha256"] = folder_sha256(tmp, exclude=(CONFIG_FILE,))  # every other file, checked when loaded
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_checkpoint(cls: type[DiffusionAvatarsModel], directory: str | os.PathLike,
                    base_model: str | os.PathLike | None = None) -> DiffusionAvatarsModel:
    """Loads a checkpoint written by :func:`save_checkpoint` (format 2, or the older format 1) as a
    ``cls``. ``base_model`` defaults to the directory recorded at save time; the text encoder is
    not needed."""
    directory = Path(directory)
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a DiffusionAvatars checkpoint directory")
    meta = json.loads(config_file.read_text())
    if meta.get("format") not in (1, FORMAT):
        raise ValueError(f"{config_file}: checkpoint format {meta.get('format')!r} is not one this code reads "
                         f"(1 or {FORMAT}); load it with the version that wrote it")
    config = DiffusionAvatarsConfig.from_dict(meta["config"])
    if not config.use_diffusion and meta.get("single_pass") != SINGLE_PASS_READING:
        raise ValueError(f"{config_file}: a 'w/o diffusion' checkpoint whose single pass read its output as the clean "
                         f"latent (single_pass {meta.get('single_pass')!r}, this code reads it as "
                         f"{SINGLE_PASS_READING!r}): retrain it with this version")
    verify(directory, meta)
    if base_model is None:
        base_model = meta.get("base_model")
    if base_model is None and config.requires_pretrained_base:
        raise ValueError(f"{directory} was trained on a pretrained base model: pass base_model / --base-model PATH")
    embedding = load_empty_prompt_embedding(directory / EMPTY_PROMPT_FILE, config.unet.cross_attention_dim)
    if meta["format"] == 1:
        model = cls(config, base_model=base_model, empty_prompt_embedding=embedding)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found")
        model.load_trainable_state_dict(load_file(str(weights)), source=str(weights))
        model.base_fingerprint = meta.get("base_fingerprint")
        return model
    missing = [name for name in cls.part_names(config) if not (directory / name / CONFIG_FILE).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} lacks the model parts {missing} (each a folder with config.json)")
    parts = {name: PART_CLASSES[name].from_pretrained(directory / name, local_files_only=True)
             for name in cls.part_names(config)}
    model = cls(config, base_model=base_model, empty_prompt_embedding=embedding, parts=parts)
    model.base_fingerprint = meta.get("base_fingerprint")
    return model


def verify(directory: Path, meta: dict) -> None:
    """Every file the checkpoint's ``config.json`` lists has the sha256 recorded at save (DataError naming
    the first that does not: a flipped bit loads as other weights without an error). A checkpoint written
    before they were recorded loads unverified, with a warning."""
    if "sha256" not in meta:
        warnings.warn(f"{directory}: written before avatars recorded the sha256 of their files; loaded without "
                      "checking them", stacklevel=3)
        return
    check_sha256(directory, meta["sha256"], directory / CONFIG_FILE,
                 "remove the folder and train the avatar again (or restore it from a copy)")


def load_trainable_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every trainable weight of a checkpoint directory (either format), keyed by the model's
    parameter names (as :meth:`DiffusionAvatarsModel.trainable_state_dict`), without building the
    model: for comparing checkpoints."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).is_file():
        verify(directory, json.loads((directory / CONFIG_FILE).read_text()))
    if (directory / WEIGHTS_FILE).is_file():
        return load_file(str(directory / WEIGHTS_FILE))
    weights = {}
    for name, prefix in PART_PREFIXES.items():
        file = directory / name / PART_WEIGHTS_FILE
        if file.is_file():
            weights.update({prefix + key: value for key, value in load_file(str(file)).items()})
    if not weights:
        raise FileNotFoundError(f"{directory} holds no trainable weights (not a DiffusionAvatars checkpoint?)")
    return weights
