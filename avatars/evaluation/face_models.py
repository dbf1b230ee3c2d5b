"""AKD / CSIM from user-provided TorchScript models, because no such weights can ship with us.

Landmark model contract: ``model(frames) -> (N, K, 2)`` keypoints in pixels for frames
(N, 3, H, W) float in [0, 1]. AKD = mean Euclidean distance between the keypoints of the
prediction and the ground truth (pixels), per frame.

Face-identity model contract: ``model(frames) -> (N, D)`` embeddings. CSIM = cosine similarity
of the prediction's and the ground truth's embeddings, per frame.

Wrap any detector (e.g. a face-alignment network, ArcFace) in a small ``torch.nn.Module`` that
honours the contract and save it with ``torch.jit.script(...).save(path)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

AKD_SKIPPED = "AKD skipped: no landmark model given (--landmark-model)"
CSIM_SKIPPED = "CSIM skipped: no face-identity model given (--face-id-model)"


@dataclass(frozen=True)
class FaceModelConfig:
    """Optional model files for the identity/keypoint metrics.

    landmark_model: TorchScript file, frames (N, 3, H, W) in [0, 1] -> keypoints (N, K, 2) in pixels.
    face_id_model: TorchScript file, frames (N, 3, H, W) in [0, 1] -> embeddings (N, D).
    batch_size: frames per forward pass.
    """

    landmark_model: Path | None = None
    face_id_model: Path | None = None
    batch_size: int = 8


def _load_script(path: Path, what: str, flag: str, device: str) -> torch.jit.ScriptModule:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist (given with {flag})")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as e:
        raise ValueError(f"{path}: not a TorchScript {what} ({flag} expects torch.jit.save output): {e}") from e


class FaceModels:
    """Loads the optional models once; `akd`/`csim` return None when their model is absent."""

    akd_skip_reason = AKD_SKIPPED
    csim_skip_reason = CSIM_SKIPPED

    def __init__(self, config: FaceModelConfig, device: str = "cpu"):
        self.config, self.device = config, device
        self._landmarks = (
            _load_script(config.landmark_model, "landmark model", "--landmark-model", device)
            if config.landmark_model
            else None
        )
        self._face_id = (
            _load_script(config.face_id_model, "face-identity model", "--face-id-model", device)
            if config.face_id_model
            else None
        )

    @torch.no_grad()
    def _run(self, model: torch.jit.ScriptModule, frames: torch.Tensor) -> torch.Tensor:
        bs = self.config.batch_size
        chunks = [frames[i : i + bs] for i in range(0, frames.shape[0], bs)]
        return torch.cat([model(chunk.to(self.device)).float().cpu() for chunk in chunks])

    def akd(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor | None:
        """Per-frame average keypoint distance in pixels, or None without a landmark model."""
        if self._landmarks is None:
            return None
        kp, kg = self._run(self._landmarks, pred), self._run(self._landmarks, gt)
        if kp.ndim != 3 or kp.shape[-1] != 2 or kp.shape != kg.shape:
            raise ValueError(f"{self.config.landmark_model}: landmark model must return (N, K, 2), "
                             f"got {tuple(kp.shape)}")
        return (kp - kg).norm(dim=-1).mean(dim=-1)

    def csim(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor | None:
        """Per-frame cosine similarity of identity embeddings, or None without a face-identity model."""
        if self._face_id is None:
            return None
        ep, eg = self._run(self._face_id, pred), self._run(self._face_id, gt)
        if ep.ndim != 2 or ep.shape != eg.shape:
            raise ValueError(f"{self.config.face_id_model}: face-identity model must return (N, D), "
                             f"got {tuple(ep.shape)}")
        return F.cosine_similarity(ep, eg, dim=-1)
