"""Per-request validation of the renderer service, run before a request joins a batch.

A batch is one pipeline call, so one request that breaks it (a float64 buffer makes
`np.stack` promote the whole batch, an unusable seed raises inside the sampler) fails
every request batched with it, and a NaN expression code or an inf depth silently
renders an all-NaN image.
Each request is therefore checked alone, for type, dtype, shape, finiteness and value
ranges of the batch contract (docs/CONTRACTS.md), and rejected with an error naming the
request and the field; the requests batched with it never see it.
"""

from __future__ import annotations

import numpy as np

#: Conditioning buffers of a request: name -> channels (the batch contract of docs/CONTRACTS.md).
BUFFER_CHANNELS = {"mask": 1, "depth": 1, "normals": 3, "canonical": 5}
#: Seeds seed a torch.Generator: unsigned 64-bit.
SEED_RANGE = (0, 2**64 - 1)
#: Slack on the [-1, 1] ranges of normals and canonical coordinates (quantisation, resampling).
RANGE_TOL = 1e-3


class InvalidRequest(ValueError):
    """A render request that breaks the batch contract; the message names the request and the field."""

    def __init__(self, key: object, field: str, problem: str):
        self.key, self.field, self.problem = key, field, problem
        super().__init__(f"request {key!r}: {field} {problem}")

    def __reduce__(self):  # crosses Ray's process boundary with its fields
        return type(self), (self.key, self.field, self.problem)


def _array(key: object, name: str, value: object) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise InvalidRequest(key, name, f"must be a numpy array, got {type(value).__name__}")
    if value.dtype != np.float32:
        raise InvalidRequest(key, name, f"must be float32, got {value.dtype}")
    return value


def _finite(key: object, name: str, a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        raise InvalidRequest(key, name, f"holds {int((~np.isfinite(a)).sum())} NaN or inf values")


def _within(key: object, name: str, a: np.ndarray, lo: float, hi: float) -> None:
    if a.size and (a.min() < lo or a.max() > hi):
        raise InvalidRequest(key, name, f"values must lie in [{lo:g}, {hi:g}], got [{a.min():g}, {a.max():g}]")


def validate_request(request: object, expression_dim: int, resolution: int | None = None) -> None:
    """Raise InvalidRequest unless `request` (a RenderRequest) can be rendered by an avatar with
    this expression dimension and resolution, whatever it is batched with."""
    key = getattr(request, "key", "")
    if not isinstance(key, str):
        raise InvalidRequest(key, "key", f"must be a str, got {type(key).__name__}")
    arrays = {name: _array(key, name, getattr(request, name, None)) for name in (*BUFFER_CHANNELS, "expression")}
    mask = arrays["mask"]
    if mask.ndim != 3:
        raise InvalidRequest(key, "mask", f"must be (1, H, W), got shape {mask.shape}")
    h, w = mask.shape[-2:]
    for name, channels in BUFFER_CHANNELS.items():
        if arrays[name].shape != (channels, h, w):
            raise InvalidRequest(key, name, f"must be ({channels}, {h}, {w}), got {tuple(arrays[name].shape)}")
    if resolution is not None and (h, w) != (resolution, resolution):
        raise InvalidRequest(key, "buffers", f"are {h}x{w} but the avatar renders {resolution}x{resolution}")
    if arrays["expression"].shape != (expression_dim,):
        raise InvalidRequest(key, "expression", f"must be ({expression_dim},) for this avatar, "
                                                f"got {tuple(arrays['expression'].shape)}")
    for name, a in arrays.items():
        _finite(key, name, a)
    if not np.isin(mask, (0.0, 1.0)).all():
        raise InvalidRequest(key, "mask", "must hold only 0 and 1")
    _within(key, "depth", arrays["depth"], 0.0, np.inf)
    _within(key, "normals", arrays["normals"], -1 - RANGE_TOL, 1 + RANGE_TOL)
    _within(key, "canonical", arrays["canonical"], -1 - RANGE_TOL, 1 + RANGE_TOL)
    seed = getattr(request, "seed", None)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise InvalidRequest(key, "seed", f"must be an int, got {type(seed).__name__}")
    if not SEED_RANGE[0] <= int(seed) <= SEED_RANGE[1]:
        raise InvalidRequest(key, "seed", f"must lie in [0, 2**64 - 1], got {seed}")
