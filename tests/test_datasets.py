from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from blackbox_saliency.datasets import ImageNetSamples, TinyImageNet, cifar10, extract_pack, scale_boxes

from conftest import SHARED_DATA, jpeg_bytes, write_pack


def test_tiny_imagenet_val_reader_with_boxes(tmp_path):
    pack = write_pack(tmp_path / "tiny-val.tar.gz", {
        "tiny-imagenet-200/val/images/val_0.JPEG": jpeg_bytes(),
        "tiny-imagenet-200/val/images/val_1.JPEG": jpeg_bytes(),
        "tiny-imagenet-200/val/val_annotations.txt": b"val_0.JPEG\tn01443537\t0\t10\t62\t50\nval_1.JPEG\tn01629819\t5\t5\t20\t20\n",
    })
    data = TinyImageNet(pack, split="val", cache_dir=tmp_path / "cache")
    assert len(data) == 2 and data.labels == [1, 25]  # goldfish, European fire salamander in ImageNet-1k
    assert data.boxes(0).tolist() == [[0, 10, 62, 50]]
    image, label = data[0]
    assert image.size == (64, 64) and label == 1
    assert TinyImageNet(pack, split="val", cache_dir=tmp_path / "cache", label_space="tiny").labels == [0, 1]


def test_extract_pack_refuses_unsafe_paths(tmp_path):
    pack = write_pack(tmp_path / "evil.tar.gz", {"../escape.txt": b"x"})
    with pytest.raises(ValueError, match="unsafe path"):
        extract_pack(pack, tmp_path / "cache")
    assert not (tmp_path / "escape.txt").exists()


def test_extract_pack_is_safe_to_call_from_several_processes_at_once(tmp_path):
    files = {f"pack/file_{i}.bin": bytes([i]) * 20_000 for i in range(50)}
    pack = write_pack(tmp_path / "pack.tar.gz", files)
    cache = tmp_path / "cache"
    (cache / "pack").mkdir(parents=True)
    (cache / "pack" / "half-written").write_text("an interrupted extraction left this")
    with ProcessPoolExecutor(4) as pool:
        folders = list(pool.map(extract_pack, [pack] * 4, [cache] * 4))
    assert len(set(folders)) == 1
    folder = folders[0]
    assert all((folder / name).read_bytes() == data for name, data in files.items())
    assert not (folder / "half-written").exists()
    assert sorted(p.name for p in cache.iterdir()) == ["pack"]  # no scratch folders left


def test_scale_boxes():
    boxes = torch.tensor([[0, 0, 63, 63], [16, 8, 31, 23]])
    assert scale_boxes(boxes, (64, 64), (224, 224)).tolist() == [[0, 0, 223, 223], [56, 28, 111, 83]]


@pytest.mark.skipif(not (SHARED_DATA / "imagenet-samples.tar.gz").exists(), reason="shared data not found")
def test_real_packs(tmp_path):
    samples = ImageNetSamples(SHARED_DATA / "imagenet-samples.tar.gz", cache_dir=tmp_path)
    assert len(samples) == 700 and 0 <= samples.labels[0] < 1000
    val = TinyImageNet(SHARED_DATA / "tiny-imagenet-200-val.tar.gz", split="val", cache_dir=tmp_path)
    assert len(val) == 5000 and len(set(val.labels)) == 200
    assert all(0 <= v < 64 for v in val.boxes(0)[0].tolist())
    test = cifar10(SHARED_DATA / "cifar10-jpeg.tar.gz", "test", cache_dir=tmp_path)
    assert len(test) == 10000 and test.classes[0] == "airplane"
