import io
import os
import tarfile
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def jpeg_bytes(colour=(200, 10, 10), size=(64, 64)) -> bytes:
    """A flat-colour JPEG file's bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_pack(path, files: dict[str, bytes]):
    """A .tar.gz data pack holding ``files`` (name: bytes), as the shared packs are."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tiny_imagenet_pack(path, split: str, wnids: list[str], per_class: int):
    """A Tiny ImageNet pack in the real one's layout, with flat-colour 64 px JPEGs."""
    files = {}
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            image = jpeg_bytes((40 * c + 20, 10 * i, 200 - 40 * c))
            folder = f"train/{wnid}/images" if split == "train" else "val/images"
            files[f"tiny-imagenet-200/{folder}/{wnid}_{i}.JPEG"] = image
    if split == "val":
        lines = "".join(f"{wnid}_{i}.JPEG\t{wnid}\t8\t8\t56\t56\n" for wnid in wnids for i in range(per_class))
        files["tiny-imagenet-200/val/val_annotations.txt"] = lines.encode()
    return write_pack(path, files)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


class ConstantLogits(torch.nn.Module):
    """A classifier whose answer is known: the same logits for every image, with a
    differentiable path from the input (a zero-weighted mean) so gradients are defined."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0.0 * x.mean(dim=(1, 2, 3), keepdim=False).unsqueeze(1)


def tiny_cnn(num_classes: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, num_classes),
    )


SMALL = {"encoder": "small", "encoder_kwargs": {"widths": [8, 16, 32], "layers_per_block": 2}}
