from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from blackbox_saliency.datasets import ImageNetSamples, ImageNetValBoxes, TinyImageNet, cifar10, extract_pack, scale_boxes

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


VAL_HEADER = b"file\tclass_index\twnid\tboxes_x0_y0_x1_y1\toriginal_size\n"


def imagenet_val_pack(path, rows: bytes, images=("ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG",
                                                 "ILSVRC2012_val_00000003.JPEG")):
    files = {f"imagenet-val-boxes/images/{name}": jpeg_bytes((30 * i, 100, 200), size=(227, 227))
             for i, name in enumerate(images)}
    files["imagenet-val-boxes/annotations.tsv"] = VAL_HEADER + rows
    return write_pack(path, files)


def test_imagenet_val_boxes_reader(tmp_path):
    pack = imagenet_val_pack(tmp_path / "imagenet-val-boxes.tar.gz", (
        b"ILSVRC2012_val_00000001.JPEG\t65\tn01751748\t10,20,100,200\t500x375\n"
        b"ILSVRC2012_val_00000002.JPEG\t970\tn09193705\t0,0,226,226;5,6,227,150\t500x375\n"  # x1 227: one past the edge
        b"ILSVRC2012_val_00000003.JPEG\t1\tn01443537\t3,4,5,6\t375x500\n"
    ))
    data = ImageNetValBoxes(pack, cache_dir=tmp_path / "cache")
    assert len(data) == 3 and data.labels == [65, 970, 1]
    image, label = data[1]
    assert image.size == (227, 227) and image.mode == "RGB" and label == 970
    boxes = data.boxes(1)
    assert boxes.dtype == torch.float32 and boxes.tolist() == [[0, 0, 226, 226], [5, 6, 226, 150]]  # inclusive, clamped
    assert data.boxes(0).tolist() == [[10, 20, 100, 200]]
    boxes[0, 0] = 99  # a copy
    assert data.boxes(1)[0, 0] == 0
    # the whole-image box maps to the whole resized image, as scale_boxes does for Tiny ImageNet
    assert scale_boxes(data.boxes(1), (227, 227), (224, 224)).tolist() == [[0, 0, 223, 223], [5, 6, 223, 148]]
    # the extracted folder (or the folder holding it) reads the same, with a transform
    folder = tmp_path / "cache" / "imagenet-val-boxes"
    for root in (folder, folder / "imagenet-val-boxes"):
        again = ImageNetValBoxes(root, transform=lambda im: im.resize((8, 8)))
        assert again.labels == data.labels and again[2][0].size == (8, 8)


def test_imagenet_val_boxes_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="pack_or_folder: .*does not exist"):
        ImageNetValBoxes(tmp_path / "missing.tar.gz")
    (tmp_path / "not-a-pack.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(ValueError, match="pack_or_folder: .*not a readable"):
        ImageNetValBoxes(tmp_path / "not-a-pack.tar.gz", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="pack_or_folder: no imagenet-val-boxes/annotations.tsv"):
        ImageNetValBoxes(tmp_path)
    bad_box = imagenet_val_pack(tmp_path / "bad-box.tar.gz", b"ILSVRC2012_val_00000001.JPEG\t65\tn01751748\t10,20,100\t500x375\n")
    with pytest.raises(ValueError, match="pack_or_folder: .*line 2"):
        ImageNetValBoxes(bad_box, cache_dir=tmp_path / "cache")
    no_image = imagenet_val_pack(tmp_path / "no-image.tar.gz", b"ILSVRC2012_val_00000009.JPEG\t65\tn01751748\t1,2,3,4\t500x375\n")
    with pytest.raises(FileNotFoundError, match="pack_or_folder: .*ILSVRC2012_val_00000009.JPEG"):
        ImageNetValBoxes(no_image, cache_dir=tmp_path / "cache")


@pytest.mark.skipif(not (SHARED_DATA / "imagenet-samples.tar.gz").exists(), reason="shared data not found")
def test_real_packs(tmp_path):
    samples = ImageNetSamples(SHARED_DATA / "imagenet-samples.tar.gz", cache_dir=tmp_path)
    assert len(samples) == 700 and 0 <= samples.labels[0] < 1000
    val = TinyImageNet(SHARED_DATA / "tiny-imagenet-200-val.tar.gz", split="val", cache_dir=tmp_path)
    assert len(val) == 5000 and len(set(val.labels)) == 200
    assert all(0 <= v < 64 for v in val.boxes(0)[0].tolist())
    test = cifar10(SHARED_DATA / "cifar10-jpeg.tar.gz", "test", cache_dir=tmp_path)
    assert len(test) == 10000 and test.classes[0] == "airplane"
