"""How does the area weight behave on real data? A reduced CIFAR-10 run that fits on a CPU.

    python benchmarks/cifar_area_weight.py --pack ../shared/data/cifar10-jpeg.tar.gz

Trains a narrow ResNet-9 (width 16) on the CIFAR-10 pack for a few epochs, then explainers
(small encoder, widths 16/32/64) with several objectives for a fixed number of steps on 45,000
training images, and scores each on the other 5,000, 500 per class (never seen by the explainer;
``heldout_split`` of hub/train_cifar10.py): saliency metric, mask area for the true and for an absent class, and the class
probability on the preserved and the removed image. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hub"))
from train_cifar10 import augment, evaluate_explainer, heldout_split, load_pack, normalise  # noqa: E402

from blackbox_saliency import SaliencyObjective, fit_explainer  # noqa: E402
from blackbox_saliency.classifiers import CifarResNet  # noqa: E402
from blackbox_saliency._precision import describe_cpu  # noqa: E402
from blackbox_saliency.training import EARLIER_DEFAULTS  # noqa: E402

VARIANTS = {
    "hinge, area 8 (authors' weights)": {},
    "hinge, area 2": {"area_weight": 2.0},
    "hinge, area 0.5": {"area_weight": 0.5},
    "probability terms (paper), area 2": {"classifier_loss": "probability", "preserve_weight": 1.0, "destroy_weight": 5.0, "area_weight": 2.0},
    "hinge, linear area (power 1) 2": {"area_power": 1.0, "area_eps": 0.0, "area_weight": 2.0},
    "hinge, linear area (power 1) 5": {"area_power": 1.0, "area_eps": 0.0, "area_weight": 5.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path(".cache/cifar_area_weight"))
    parser.add_argument("--classifier-epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_pack(args.pack)
    images, labels = data["train"]
    train_rows, heldout_rows = heldout_split(labels)
    args.cache.mkdir(parents=True, exist_ok=True)
    classifier = CifarResNet(width=16)
    weights = args.cache / f"classifier-w16-e{args.classifier_epochs}.pt"
    if weights.exists():
        classifier.load_state_dict(torch.load(weights, weights_only=True))
    else:
        opt = torch.optim.SGD(classifier.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        steps = args.classifier_epochs * (50000 // 256)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps, pct_start=0.25)
        for epoch in range(args.classifier_epochs):
            classifier.train()
            order = torch.randperm(50000)
            for i in range(0, 50000 - 255, 256):
                idx = order[i : i + 256]
                loss = torch.nn.functional.cross_entropy(classifier(augment(normalise(images[idx]))), labels[idx], label_smoothing=0.1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            print(f"classifier epoch {epoch + 1}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
        torch.save(classifier.state_dict(), weights)
    classifier.eval()
    test_x, test_y = data["test"]
    with torch.no_grad():
        acc = sum((classifier(normalise(test_x[i : i + 1000])).argmax(1) == test_y[i : i + 1000]).sum().item()
                  for i in range(0, 10000, 1000)) / 10000
        margins = classifier(normalise(images[heldout_rows[:1000]])).topk(2, 1).values
    print(f"machine: {describe_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}; classifier "
          f"test accuracy {acc:.3f}, median top-2 logit gap {(margins[:, 0] - margins[:, 1]).median():.2f}; "
          f"{args.steps} explainer steps of batch 64\n")
    print("| objective | saliency metric | area, true class | area, absent class | p original | p preserved | p removed | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    train_set = TensorDataset(normalise(images[train_rows]), labels[train_rows])
    for name, settings in VARIANTS.items():
        if args.only and not name.startswith(args.only):
            continue
        start = time.time()
        explainer = fit_explainer(classifier, train_set, encoder="small", encoder_kwargs={"widths": [16, 32, 64]},
                                  epochs=100, max_steps=args.steps, device="cpu", progress=False,
                                  objective=SaliencyObjective(**settings), **EARLIER_DEFAULTS)  # as measured
        r = evaluate_explainer(explainer, classifier, images[heldout_rows], labels[heldout_rows], "cpu")
        print(f"| {name} | {r['saliency_metric']:.3f} | {r['area_true']:.3f} | {r['area_absent']:.3f} | "
              f"{r['p_original']:.3f} | {r['p_preserved']:.3f} | {r['p_removed']:.3f} | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
