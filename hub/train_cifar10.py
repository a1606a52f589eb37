"""Train this project's CIFAR-10 classifier and its explainers (the paper's section 5.2).

    # from the repository root, on a CPU (bf16 where native) or a GPU; each step checkpoints into
    # ~/.cache/blackbox-saliency/runs and the same command resumes an interrupted run:
    nohup python hub/train_cifar10.py classifier --pack ../shared/data/cifar10-jpeg.tar.gz --out blackbox_saliency/weights --epochs 16 \
        > cifar10-classifier.log 2>&1 &
    python hub/train_cifar10.py explainer --pack ../shared/data/cifar10-jpeg.tar.gz --out blackbox_saliency/weights --seed 1

``classifier`` trains a ResNet-9-style network on all 50,000 training images (data kept on the
GPU, bf16, SGD with a one-cycle schedule) and writes ``OUT/classifier-cifar10``: fp16
safetensors weights, config and log, with its accuracy on the 10,000 test images.

``explainer`` trains an explainer with ``fit_explainer(classifier, data, recipe="cifar")`` (small
random-init encoder, a long class embedding stage kept fixed while the masks train) on 45,000
training images and scores it on the other 5,000 (500 per class), which it never saw, with the
saliency metric and mask areas: model selection uses those, never the test set. It writes
``OUT/explainer-cifar10``. Checkpoints are kept per seed; the same command resumes.

``score`` re-scores saved explainers on those 5,000 held-out images (against ``OUT``'s classifier)
and compares each pair's masks:

    python hub/train_cifar10.py score --pack ../shared/data/cifar10-jpeg.tar.gz --out OUT --explainer FOLDER
"""

from __future__ import annotations

import argparse
import os
import io
import json
import logging
import shlex
import sys
import tarfile
import time
from datetime import date
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from blackbox_saliency import fit_explainer, get_recipe
from blackbox_saliency.allocator import keep_freed_memory
from blackbox_saliency.datasets import DecodedImages
from blackbox_saliency.classifiers import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CifarResNet
from blackbox_saliency.metrics import saliency_metric
from blackbox_saliency._precision import describe_cpu

HELDOUT_PER_CLASS = 500  # 5,000 of the 50,000 training images, never trained on
HELDOUT_DATA = ("CIFAR-10 training images held out by hub/train_cifar10.py heldout_split (500 per class, never "
                "trained on), true label; blurred alternative")


def _decode(item: tuple[str, bytes]) -> tuple[str, np.ndarray]:
    return item[0], np.asarray(Image.open(io.BytesIO(item[1])).convert("RGB"))


def load_pack(pack: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """All of CIFAR-10 as uint8 ``(N, 3, 32, 32)`` and labels, class index = sorted folder name."""
    raw = {"train": [], "test": []}
    with tarfile.open(pack) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and parts[1] in raw:
                raw[parts[1]].append((member.name, tar.extractfile(member).read()))
    out = {}
    with ProcessPoolExecutor() as pool:
        for split, items in raw.items():
            items.sort()
            decoded = list(pool.map(_decode, items, chunksize=512))
            images = torch.from_numpy(np.stack([a for _, a in decoded])).permute(0, 3, 1, 2).contiguous()
            labels = torch.tensor([CIFAR10_CLASSES.index(name.split("/")[2]) for name, _ in decoded])
            out[split] = (images, labels)
    return out


def heldout_split(labels: torch.Tensor, per_class: int = 500, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, heldout)`` of the training images: ``per_class`` images of every class,
    drawn by a fixed permutation, are held out for model selection.

    The pack's images come sorted by class, so a plain "last 5,000" would hold out only trucks
    and train on none (the first CIFAR-10 explainer run did exactly that).
    """
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        held[order[labels[order] == c][:per_class]] = True
    return order[~held[order]], held.nonzero().squeeze(1)


def subset(images: torch.Tensor, labels: torch.Tensor, limit: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``limit`` images drawn by a fixed permutation (every class, not the first one's only)."""
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return images[keep], labels[keep]


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random crop with 4 px reflect padding and horizontal flip, on the GPU."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2, n), device=x.device)
    rows = (dy.view(n, 1) + torch.arange(32, device=x.device)).view(n, 1, 32, 1).expand(n, 3, 32, 40)
    x = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(32, device=x.device)).view(n, 1, 1, 32).expand(n, 3, 32, 32)
    x = x.gather(3, cols)
    flip = torch.rand(n, 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


def _bf16(device: str) -> bool:
    """bf16 autocast where it is fast: CUDA, or a CPU with native bf16 (measured 3.8x faster
    than float32 for this network's forward and backward on the 2-core AMX CPU here)."""
    from blackbox_saliency.training.runtime import use_bf16

    return use_bf16("auto", torch.device(device))


def accuracy(model, images, labels, device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=_bf16(device)):
        for i in range(0, len(images), 1000):
            x = normalise(images[i : i + 1000].to(device))
            correct += (model(x).argmax(1).cpu() == labels[i : i + 1000]).sum().item()
    return correct / len(images)


def train_classifier(data, out: Path, epochs: int, device: str, seed: int, checkpoints: Path | None = None) -> None:
    """Train the classifier; with ``checkpoints``, save after every epoch and resume from there
    (the same command continues an interrupted run)."""
    torch.manual_seed(seed)
    x_train, y_train = data["train"][0].to(device), data["train"][1].to(device)
    model = CifarResNet().to(device).to(memory_format=torch.channels_last)
    batch = 512
    steps = epochs * (len(x_train) // batch)
    decay, no_decay = [p for p in model.parameters() if p.dim() > 1], [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0}],
                                lr=0.2, momentum=0.9, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=steps, pct_start=0.25)
    log, start, first = [], time.time(), 0
    state_file = checkpoints / f"cifar10-classifier-e{epochs}-s{seed}.pt" if checkpoints else None
    if state_file is not None and state_file.exists():
        state = torch.load(state_file, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        first, log = int(state["epoch"]), list(state["log"])
        start -= float(state["seconds"])
        print(f"resumed from {state_file} after epoch {first}", flush=True)
    for epoch in range(first, epochs):
        model.train()
        order = torch.randperm(len(x_train), device=device)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            x = augment(normalise(x_train[idx])).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device, torch.bfloat16, enabled=_bf16(device)):
                loss = F.cross_entropy(model(x).float(), y_train[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        line = f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f} time {time.time() - start:.0f}s"
        if epoch + 1 == epochs or (epoch + 1) % 5 == 0:
            line += f" test accuracy {accuracy(model, *data['test'], device):.4f}"
        print(line, flush=True)
        log.append(line)
        if state_file is not None:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_file.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "rng": torch.get_rng_state(), "epoch": epoch + 1, "log": log,
                        "seconds": time.time() - start}, tmp)
            os.replace(tmp, state_file)
    test_accuracy = accuracy(model, *data["test"], device)
    folder = out / "classifier-cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: (v.half() if v.is_floating_point() else v).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    # the accuracy of the weights as stored (fp16), not of the fp32 ones in memory
    stored = CifarResNet().to(device)
    stored.load_state_dict(state)
    stored_accuracy = accuracy(stored, *data["test"], device)
    config = {"architecture": "CifarResNet", "num_classes": 10, "width": 64, "mean": list(CIFAR10_MEAN),
              "std": list(CIFAR10_STD), "classes": CIFAR10_CLASSES, "input_size": [3, 32, 32],
              "test_accuracy": stored_accuracy, "test_accuracy_fp32": test_accuracy,
              "training": {"epochs": epochs, "batch_size": batch, "optimizer": "SGD nesterov 0.9, wd 5e-4",
                           "schedule": "one-cycle, max lr 0.2", "label_smoothing": 0.1, "seed": seed,
                           "augment": "random crop (pad 4, reflect) + flip", "bf16": _bf16(device),
                           "seconds": round(time.time() - start),
                           "device": torch.cuda.get_device_name() if device == "cuda" else f"{describe_cpu()} CPU, "
                                     f"{torch.get_num_threads()} threads"}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "train.log").write_text("\n".join(log) + "\n")
    print(f"classifier: test accuracy {stored_accuracy:.4f} (fp16 weights), {test_accuracy:.4f} (fp32)", flush=True)


def evaluate_explainer(explainer, classifier, images, labels, device) -> dict[str, float]:
    """Scores on held-out images: saliency metric (true class), mask areas, and the class
    probability on the preserved and the removed image (blurred alternative); the share of
    true-class masks with no pixel above 0.5 (their box is the whole image) and how often the
    class embedding ranks the true class first (an empty mask mostly means it did not)."""
    from blackbox_saliency.evidence import blur_sigma_for, gaussian_blur

    results = {"saliency_metric": [], "area_true": [], "area_absent": [], "p_original": [], "p_preserved": [], "p_removed": [],
               "empty_true": [], "presence_top1": []}
    with torch.no_grad():
        for i in range(0, len(images), 500):
            x, y = normalise(images[i : i + 500].to(device)), labels[i : i + 500].to(device)
            masks = explainer(x, y)
            absent = explainer(x, (y + torch.randint(1, 10, y.shape, device=device)) % 10)
            blurred = gaussian_blur(x, blur_sigma_for(32, 32))
            prob = lambda z: classifier(z).float().softmax(1).gather(1, y[:, None]).squeeze(1)  # noqa: E731
            results["saliency_metric"].append(saliency_metric(classifier, x, masks, y))
            results["area_true"].append(masks.mean(dim=(1, 2, 3)))
            results["area_absent"].append(absent.mean(dim=(1, 2, 3)))
            results["p_original"].append(prob(x))
            results["p_preserved"].append(prob(x * masks + blurred * (1 - masks)))
            results["p_removed"].append(prob(x * (1 - masks) + blurred * masks))
            results["empty_true"].append((masks.amax(dim=(1, 2, 3)) <= 0.5).float())
            results["presence_top1"].append((explainer.masking_model.presence(x).argmax(1) == y).float())
    return {k: torch.cat(v).mean().item() for k, v in results.items()}


def _classifier_and_split(data, out: Path, device: str):
    """``OUT``'s classifier on ``device``, the training images and labels, and the rows to train
    on and to hold out (the same for every explainer run and every ``score``)."""
    from blackbox_saliency import hub
    from blackbox_saliency.classifiers import _load_cifar10

    hub.WEIGHTS_FOLDER = out  # read the classifier trained there
    classifier, _ = _load_cifar10()
    classifier.to(device)
    images, labels = data["train"]
    per_class = min(HELDOUT_PER_CLASS, len(labels) // (10 * len(CIFAR10_CLASSES)))
    train_rows, heldout_rows = heldout_split(labels, per_class=per_class)
    return classifier, images, labels, train_rows, heldout_rows


def train_explainer(data, out: Path, epochs: int | None, device: str, seed: int, max_steps: int | None,
                    checkpoints: Path) -> None:
    classifier, images, labels, train_rows, heldout_rows = _classifier_and_split(data, out, device)
    # uint8 in memory, normalised a batch at a time (no loader)
    train_set = DecodedImages(images[train_rows], labels[train_rows], size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    start = time.time()
    explainer = fit_explainer(classifier, train_set, "cifar", steps=max_steps, epochs=None if max_steps else epochs,
                              device=device, seed=seed, checkpoint_dir=checkpoints / f"cifar10-explainer-seed{seed}",
                              resume=True, progress=False)
    explainer.config.classifier.name = "cifar10_resnet9 (blackbox_saliency.load_classifier('cifar10'))"
    explainer.config.classifier.class_names = list(CIFAR10_CLASSES)
    seconds = time.time() - start
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every process has the explainer; one reports
        return
    device = explainer.device
    scores = evaluate_explainer(explainer, classifier, images[heldout_rows], labels[heldout_rows], device)
    explainer.config.training_data = (f"all CIFAR-10 training images (JPEG copy) except the held-out "
                                      f"{len(heldout_rows):,} (hub/train_cifar10.py heldout_split), random flips")
    explainer.config.training["seconds"] = round(seconds)
    explainer.config.training["device"] = (
        f"{os.environ.get('WORLD_SIZE', '1')} x {torch.cuda.get_device_name(device)}" if device.type == "cuda"
        else f"{describe_cpu()} CPU, {torch.get_num_threads()} threads")
    explainer.config.training["date"] = str(date.today())
    explainer.config.training["command"] = " ".join(["python hub/train_cifar10.py", *map(shlex.quote, sys.argv[1:])])
    explainer.config.evaluation = {
        "data": HELDOUT_DATA, "results": [{"images": len(heldout_rows), **scores}]}
    folder = out / "explainer-cifar10"
    explainer.save_pretrained(folder)
    (folder / "heldout.json").write_text(json.dumps({"heldout_images": HELDOUT_DATA, **scores}, indent=2))
    print(f"explainer: {seconds:.0f}s, held-out {json.dumps(scores)}", flush=True)


def score_explainers(data, out: Path, folders: list[Path], device: str, seed: int) -> None:
    """Print each saved explainer's held-out scores (those ``explainer`` writes to heldout.json),
    then, for every pair of them, how alike their true-class masks are (:func:`mask_agreement`)."""
    from blackbox_saliency import Explainer

    classifier, images, labels, _, heldout_rows = _classifier_and_split(data, out, device)
    masks = []  # (folder, true-class masks), in the order given: the same folder may come twice
    for folder in folders:
        explainer = Explainer.from_pretrained(folder).to(device).eval()
        torch.manual_seed(seed)  # the absent classes drawn
        scores = evaluate_explainer(explainer, classifier, images[heldout_rows], labels[heldout_rows], explainer.device)
        print(f"{folder}: held-out ({len(heldout_rows)} images) {json.dumps(scores)}", flush=True)
        with torch.no_grad():
            masks.append((folder, torch.cat([explainer(normalise(images[heldout_rows][i : i + 500].to(explainer.device)),
                                                 labels[heldout_rows][i : i + 500].to(explainer.device)).cpu()
                                       for i in range(0, len(heldout_rows), 500)])))
    for i, (a, masks_a) in enumerate(masks):
        for b, masks_b in masks[i + 1 :]:
            print(f"{a} vs {b}: {json.dumps(mask_agreement(masks_a, masks_b))}", flush=True)


def mask_agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How alike two explainers' masks for the same images and classes are: the mean absolute
    difference, and over the images where either mask has a pixel above 0.5, the mean IoU of
    those pixels (0 where only one of the two has any)."""
    on_a, on_b = (a > 0.5).flatten(1), (b > 0.5).flatten(1)
    union = (on_a | on_b).sum(1)
    either = union > 0
    iou = (on_a & on_b).sum(1)[either].float() / union[either].float()
    return {"mean_abs_difference": (a - b).abs().mean().item(),
            "iou_above_half": iou.mean().item() if either.any() else float("nan"),
            "images_either_non_empty": either.float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["classifier", "explainer", "score"])
    parser.add_argument("--pack", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("blackbox_saliency/weights"))
    parser.add_argument("--epochs", type=int, default=None, help="default: 30 (classifier), the recipe's (explainer)")
    parser.add_argument("--max-steps", type=int, default=None, help="explainer: stop early (smoke tests)")
    parser.add_argument("--limit", type=int, default=None, help="use only this many images per split (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--explainer", type=Path, action="append", default=[],
                        help="score: an explainer folder; repeat for several")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="explainer checkpoints; default ~/.cache/blackbox-saliency/runs (outside the checkout)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        keep_freed_memory()  # as fit_explainer and the CLI do on the CPU (docs/speed.md, "The CPU's allocator")
    if args.stage == "score" and not args.explainer:
        parser.error("--explainer: score needs at least one explainer folder")
    data = load_pack(args.pack)
    if args.limit:
        data = {k: subset(*v, args.limit) for k, v in data.items()}
    if args.stage == "classifier":
        checkpoints = args.checkpoints or Path.home() / ".cache" / "blackbox-saliency" / "runs"
        train_classifier(data, args.out, args.epochs or 30, device, args.seed, checkpoints)
    elif args.stage == "score":
        score_explainers(data, args.out, args.explainer, device, args.seed)
    else:
        checkpoints = args.checkpoints or Path.home() / ".cache" / "blackbox-saliency" / "runs"
        train_explainer(data, args.out, args.epochs, device, args.seed, args.max_steps, checkpoints)


if __name__ == "__main__":
    main()
