"""Small models used by the demo, the tests and the benchmarks.

Each ``build_*`` is a ``ModelSpec.load`` function: deterministic weights, so every worker (and a
direct call in the client) computes the same outputs.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np


def build_tiny_cnn(device: str = "cpu") -> Any:
    """The benchmarks' CPU case: a 3-conv CNN on 64x64x3 uint8 images -> 10 logits (float32)."""
    import torch
    from torch import nn

    class TinyCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
            )
            self.head = nn.Linear(64, 10)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            # uint8 NHWC as sent by clients -> float NCHW in [0, 1]
            x = images.permute(0, 3, 1, 2).float().div_(255.0)
            return self.head(self.features(x).flatten(1))

    model = TinyCNN()
    _deterministic_init(model)
    return model


def _deterministic_init(model: Any, seed: int = 0) -> None:
    """Same weights in every process and thread (torch's global RNG is shared between threads)."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for param in model.parameters():
            fan_in = max(1, param[0].numel()) if param.ndim > 1 else max(1, param.numel())
            values = rng.standard_normal(tuple(param.shape)).astype(np.float32) / np.sqrt(fan_in)
            param.copy_(torch.from_numpy(values))


def tiny_cnn_images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random uint8 images of shape (64, 64, 3)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)


def build_tiny_text_encoder(device: str = "cpu") -> Any:
    """A 2-layer transformer encoder of token ids (vocabulary 1,000, width 64), called as
    ``model(input_ids=..., attention_mask=...)`` like a Hugging Face model; returns
    ``{"last_hidden_state": (batch, length, 64), "pooler_output": (batch, 64)}`` (the mean over
    the real tokens). Padding never changes a request's outputs."""
    import torch
    from torch import nn

    class TinyTextEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(1000, 64)
            self.position = nn.Embedding(512, 64)
            layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.embed(input_ids) + self.position(positions)[None]
            hidden = self.encoder(x, src_key_padding_mask=attention_mask == 0)
            mask = attention_mask[..., None].to(hidden.dtype)
            return {"last_hidden_state": hidden, "pooler_output": (hidden * mask).sum(1) / mask.sum(1)}

    model = TinyTextEncoder()
    _deterministic_init(model)
    return model


def token_ids(n: int, seed: int = 0, median: int = 40, longest: int = 300) -> list[np.ndarray]:
    """``n`` requests of token ids (int64) with log-normal lengths from 2 to ``longest``."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(median), 0.8, n)), 2, longest).astype(int)
    return [rng.integers(1, 1000, int(length)) for length in lengths]


def build_identity(device: str = "cpu"):
    """A no-op model (returns its input): measures the front end alone."""
    return _identity


def _identity(batch):
    return batch


def build_affine(device: str = "cpu"):
    """``y = 2 * x + 1`` on batched float arrays (NumPy on CPU, CuPy on GPU workers)."""
    return _affine


def _affine(batch):
    return batch * 2 + 1


def build_numpy_mlp(device: str = "cpu", features: int = 256, hidden: int = 1024, classes: int = 16):
    """A two-layer MLP written with array operations only: runs on NumPy or CuPy arrays alike."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((features, hidden), dtype=np.float32) / np.sqrt(features)
    w2 = rng.standard_normal((hidden, classes), dtype=np.float32) / np.sqrt(hidden)
    cache: dict[str, Any] = {}

    def mlp(batch):
        xp = type(batch).__module__.split(".")[0] == "cupy" and __import__("cupy") or np
        if xp.__name__ not in cache:
            cache[xp.__name__] = (xp.asarray(w1), xp.asarray(w2))
        a, b = cache[xp.__name__]
        h = xp.maximum(batch.astype(xp.float32) @ a, 0)
        return h @ b

    return mlp


def build_torch_mlp(device: str = "cpu", features: int = 16, hidden: int = 32, classes: int = 4) -> Any:
    """A small torch MLP on float32 vectors (compiles in about a second on a CPU: for compile tests)."""
    from torch import nn

    model = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes)).eval()
    _deterministic_init(model)
    return model


def build_resnet50(device: str = "cpu") -> Any:
    """ResNet-50 (torchvision, random weights: nothing is downloaded) for uint8 224x224x3 images.

    A variant per device: fp16 and channels-last on CUDA, fp32 on CPU. Inputs arrive as the
    client sent them (uint8, NHWC); the conversion runs on the device inside ``forward``.
    """
    import torch
    import torchvision
    from torch import nn

    cuda = str(device).startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32

    class ResNet50FromUint8(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torchvision.models.resnet50(weights=None)
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.permute(0, 3, 1, 2).to(dtype)
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            return self.net(x)

    model = ResNet50FromUint8().eval()
    _deterministic_init(model)
    model = model.to(dtype=dtype)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    return model


def resnet_images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random uint8 images of shape (224, 224, 3)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 224, 224, 3), dtype=np.uint8)


def timed_model(seconds_per_sample: dict, overhead: float = 0.0005):
    """A ``load`` for heterogeneous-placement runs: the model returns its input after sleeping
    ``overhead + seconds_per_sample[worker name] * rows`` (sleeping releases the GIL, so the speeds
    hold however busy the machine is). It calls ``distributed.get_worker()`` to pick its speed, as a
    per-worker variant would."""
    return functools.partial(_build_timed, dict(seconds_per_sample), overhead)


def _build_timed(seconds_per_sample: dict, overhead: float, device: str = "cpu"):
    import time

    from distributed import get_worker

    per_sample = seconds_per_sample[get_worker().name]

    def model(batch):
        time.sleep(overhead + per_sample * len(batch))
        return batch

    return model
