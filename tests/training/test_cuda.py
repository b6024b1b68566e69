"""The training loop's CUDA path (bf16 autocast, channels_last): runs only where a GPU exists."""

import numpy as np
import pytest
import torch

from medpipe.models.cnn import CNNS
from medpipe.training.config import TrainConfig
from medpipe.training.data import ArrayBatches
from medpipe.training.device import predict_batches
from medpipe.training.loop import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def stripes(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: horizontal stripes, class 1: vertical stripes, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]
    patterns = [((yy // 2) % 2) * 200, ((xx // 2) % 2) * 200]
    images, labels = [], []
    for label, pattern in enumerate(patterns):
        for _ in range(n_per_class):
            noisy = np.clip(pattern + rng.normal(0, 30, pattern.shape), 0, 255).astype(np.uint8)
            images.append(np.stack([noisy] * 3, axis=2))
            labels.append(label)
    return np.stack(images), np.array(labels)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_fit_on_cuda_learns_and_keeps_the_model_on_the_gpu(precision):
    torch.manual_seed(0)
    images, labels = stripes(64)
    val_images, val_labels = stripes(16, seed=1)
    cfg = TrainConfig(lr=3e-3, epochs=4, batch_size=32, precision=precision, channels_last=True, device="cuda",
                      monitor="accuracy", patience=10)
    train = ArrayBatches(images, labels, batch_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, shuffle=True,
                         drop_last=True, seed=0)
    val = ArrayBatches(val_images, val_labels, batch_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = CNNS["cnn_two_conv"](num_classes=2, input_size=16, dropout=0.0)

    def val_fn(m):
        logits, targets = predict_batches(m, val)
        return {"accuracy": float((logits.argmax(1) == targets).float().mean())}

    result = fit(model, train, torch.nn.functional.cross_entropy, val_fn, cfg)
    assert next(model.parameters()).device.type == "cuda"
    assert result.best_metrics["accuracy"] > 0.9  # chance is 0.5
