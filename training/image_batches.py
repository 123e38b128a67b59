"""uint8 image batches to and from the trainers' float tensors, and an eval-mode forward
pass between them (training samples, validation and evaluation of every image net)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


def to_tensor(batch: np.ndarray, device: torch.device) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1] on ``device``."""
    tensor = torch.from_numpy(np.ascontiguousarray(batch)).to(device, non_blocking=True)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8_images(batch: Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) uint8 (rounded, clamped)."""
    return batch.detach().float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1) \
        .cpu().numpy()


def predict_images(model: nn.Module, images: np.ndarray, device: torch.device,
                   channels_last: bool = False) -> np.ndarray:
    """``model`` in eval mode, without gradients, on (N, H, W, 3) uint8 images -> uint8
    images; the model's training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = to_tensor(images, device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return to_uint8_images(model(x))
    finally:
        model.train(was_training)
