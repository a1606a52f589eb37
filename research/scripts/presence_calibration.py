"""Why an absent class gets a mask: the class filter's presence scores on each kind of image.

    python benchmarks/presence_calibration.py --explainer blackbox_saliency/weights/explainer-efficientnet_lite0 \
        --imagenet-pack ../shared/data/imagenet-samples.tar.gz --tiny-pack ../shared/data/tiny-imagenet-200-val.tar.gz

The masking model filters its features by ``sigmoid(X_ij^T C_c)`` and scores class ``c`` present
when ``max_ij X_ij^T C_c > 0``. For each data set (at 224 px, Lite0's own size) and explainer this
prints: the mean norm of the feature vectors ``X_ij`` the filter reads; the mean class score
(centred, for an explainer with ``presence_reference``); the share of all 1000 classes scored
present per image; how the true class ranks among
them; the true class's mean attention ``sigmoid(X_ij^T C_c)`` over the map (what the decoder's
features are multiplied by); how often a random absent class (the same draw as ``benchmarks/evaluate.py``) is scored
present; and the absent class's mean mask where it is scored present and where it is not. A
filter calibrated on one kind of image and not another shows up as a jump in the first column.

``--std-threshold t`` (repeatable) adds, for each explainer, rows with its class scores
standardised per image at ``t`` (``presence_std_threshold``, set on a copy; its decoder was
trained as it was, so only the filter's columns are the standardised filter's). ``--untrained-head``
adds the filter a ``class_embedding="classifier_head"`` explainer starts from before any training
(Lite0's own head through its head's input path: its class activation maps, linearised).
"""

from __future__ import annotations

import argparse
import math
from argparse import Namespace
from datetime import date
from pathlib import Path

import torch

from blackbox_saliency import Explainer, load_classifier
from blackbox_saliency._blackbox import head_weight
from blackbox_saliency.encoders import classifier_features
from blackbox_saliency._precision import describe_cpu

from evaluate import load_data


def presence_rows(explainer: Explainer, images: torch.Tensor, labels: torch.Tensor, absent: torch.Tensor,
                  batch_size: int) -> dict[str, float]:
    """The presence statistics of one explainer on one set of images (see the module's text)."""
    model = explainer.masking_model
    scores, masks, norms, attention = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            features = model._features(images[i : i + batch_size])[-1]
            norms.append(features.float().norm(dim=1).mean((1, 2)))
            scores.append(model.feature_filter.class_logits(features).float())
            attention.append(model.feature_filter(features, labels[i : i + batch_size])[1].float().mean((1, 2, 3)))
            masks.append(model(images[i : i + batch_size], absent[i : i + batch_size]).mask.mean((1, 2, 3)))
    scores, absent_mask = torch.cat(scores), torch.cat(masks)
    true_score = scores.gather(1, labels[:, None])
    true_rank = (scores > true_score).sum(1)
    absent_present = scores.gather(1, absent[:, None]).squeeze(1) > 0
    share = lambda rows: absent_mask[rows].mean().item() if rows.any() else float("nan")  # noqa: E731
    return {
        "feature norm": torch.cat(norms).mean().item(),
        "mean class score": scores.mean().item(),
        "classes scored present": (scores > 0).float().mean().item(),
        "true class first": (true_rank == 0).float().mean().item(),
        "true class in top 5": (true_rank < 5).float().mean().item(),
        "true class scored present": (true_score.squeeze(1) > 0).float().mean().item(),
        "true class attention": torch.cat(attention).mean().item(),
        "absent class scored present": absent_present.float().mean().item(),
        "absent mask, scored present": share(absent_present),
        "absent mask, not": share(~absent_present),
        "absent mask, all": absent_mask.mean().item(),
    }


def untrained_head_explainer(classifier: torch.nn.Module) -> Explainer:
    """The explainer ``fit_explainer(..., class_embedding="classifier_head")`` starts from for a
    timm classifier: its own feature pyramid as the encoder and the filter's map set from the
    head's input path; nothing trained (the decoder is random)."""
    encoder = classifier_features(classifier)
    head = head_weight(classifier, classifier.num_classes)
    cfg = classifier.pretrained_cfg
    explainer = Explainer(classifier.num_classes, encoder, class_embedding="classifier_head",
                          class_embedding_features=head.shape[1],
                          classifier_info={"input_size": list(cfg["input_size"]), "mean": list(cfg["mean"]),
                                           "std": list(cfg["std"])})
    explainer.masking_model.feature_filter.set_head(head, getattr(encoder, "head_input_map", None))
    return explainer.eval()


def standardised(explainer: Explainer, threshold: float) -> Explainer:
    """A copy of ``explainer`` whose filter standardises each image's class scores at ``threshold``."""
    copy = Explainer.from_config(explainer.config)
    copy.load_state_dict(explainer.state_dict())
    copy.masking_model.feature_filter.presence_reference = None
    copy.masking_model.feature_filter.presence_std_threshold = float(threshold)
    return copy.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explainer", action="append", default=[], help="folder or Hub id; repeat to compare")
    parser.add_argument("--imagenet-pack", type=Path, required=True)
    parser.add_argument("--tiny-pack", type=Path, required=True, help="the Tiny ImageNet val pack")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=500, help="images of each data set")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--std-threshold", type=float, action="append", default=[],
                        help="also score each explainer with its class scores standardised at this threshold")
    parser.add_argument("--untrained-head", action="store_true",
                        help="also score the untrained classifier_head filter (Lite0's linearised class maps)")
    args = parser.parse_args()
    if not (args.explainer or args.untrained_head):
        parser.error("--explainer: give at least one (or --untrained-head)")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("limit", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if not all(math.isfinite(t) for t in args.std_threshold):
        parser.error(f"--std-threshold: must be finite numbers, got {args.std_threshold}")
    classifier, preprocess = load_classifier("efficientnet_lite0")
    explainers = {name: Explainer.from_pretrained(name).eval() for name in args.explainer}
    if args.untrained_head:
        explainers["untrained classifier_head filter"] = untrained_head_explainer(classifier)
    for name, explainer in list(explainers.items()):
        for t in args.std_threshold:
            explainers[f"{name}, standardised at {t:g}"] = standardised(explainer, t)
    print(f"Machine: {describe_cpu()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
          f"date: {date.today()}.\n")
    header = None
    for data, pack in (("imagenet-samples", args.imagenet_pack), ("tiny-val", args.tiny_pack)):
        images, labels, _ = load_data(Namespace(data=data, pack=pack, cache=args.cache, limit=args.limit,
                                                seed=args.seed), classifier, preprocess)
        g = torch.Generator().manual_seed(args.seed + 1)  # the absent classes evaluate.py draws
        absent = (labels + torch.randint(1, 1000, labels.shape, generator=g)) % 1000
        for name, explainer in explainers.items():
            row = presence_rows(explainer, images, labels, absent, args.batch_size)
            if header is None:
                header = list(row)
                print("| data | images | explainer | " + " | ".join(header) + " |")
                print("| --- | --- | --- | " + " | ".join("---" for _ in header) + " |")
            print(f"| {data} | {len(images)} | `{name}` | " + " | ".join(f"{row[k]:.3f}" for k in header) + " |")


if __name__ == "__main__":
    main()
