"""Does the training precision change what the explainer learns? The learned-CNN planted task
of ``tests/test_planted_evidence.py``, trained with each part's precision fixed, per seed.

    python benchmarks/planted_precision.py --parts fff,bbb,bfb,fbb,bbf --seeds 0 --threads 2

``--parts``: one code per run, three letters for the masking model, the classifier and the
embedding stage, ``b`` for bf16 autocast and ``f`` for float32 (what ``precision="auto"`` may
choose part by part after timing them). Prints the true class's mean mask, an absent class's
(``(label + 1) % 4``), the true class's mask inside and outside the planted pattern, and the class
filter's own verdict (the share of images whose true class it ranks first, and the share whose
absent class it scores present, ``max_ij X_ij^T C_c > 0``), on 300 held-out images: a filter that
calls the absent class present explains an absent-class mask; one that does not, with a mask all
the same, points at the decoder. ``--freeze-embedding`` keeps what the embedding stage learnt
fixed in the mask stage (``--freeze-embedding class_embedding``: the class embedding only, the
encoder left to train); ``--presence-weight`` weighs the presence loss that keeps training it
there otherwise. Needs a CPU with native bf16 for ``b`` to mean bf16.
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import torch

import blackbox_saliency.training as training
from blackbox_saliency import fit_explainer
from blackbox_saliency._precision import PartPrecision, describe_cpu
from blackbox_saliency.testing import PlantedPatterns, inside_boxes, train_pattern_cnn
from blackbox_saliency.training import EARLIER_DEFAULTS

ENCODER = {"encoder": "small", "encoder_kwargs": {"widths": [16, 32, 64]}}


def parse_parts(code: str) -> PartPrecision:
    """``"bfb"`` -> masking model bf16, classifier float32, embedding stage bf16."""
    if len(code) != 3 or set(code) - {"b", "f"}:
        raise ValueError(f"--parts: expected three letters of b/f per run (e.g. bfb), got {code!r}")
    return PartPrecision(*(c == "b" for c in code))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="fff,bbb", help="comma-separated codes, e.g. fff,bbb,fbb")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--embedding-steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--freeze-embedding", nargs="?", const="all", choices=["all", "class_embedding"],
                        help="alone (or 'all'): class embedding and encoder; 'class_embedding': the embedding only")
    parser.add_argument("--presence-weight", type=float, default=1.0, help="fit_explainer's presence_weight")
    parser.add_argument("--mask-reduction", type=int, default=None,
                        help="the explainer's mask_reduction (default: 4, a 10 x 10 mask for 40 px, as measured)")
    args = parser.parse_args()
    freeze = {None: False, "all": True}.get(args.freeze_embedding, args.freeze_embedding)
    try:
        runs = [(code, parse_parts(code)) for code in args.parts.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as err:
        parser.error(str(err) if "--parts" in str(err) else f"--seeds: expected comma-separated ints ({err})")
    if args.threads:
        torch.set_num_threads(args.threads)
    train = PlantedPatterns(4000, size=40, patch=8, noise=0.15, seed=10)
    test = PlantedPatterns(300, size=40, patch=8, noise=0.15, seed=11)
    classifier = train_pattern_cnn(train, steps=400)
    print(f"Machine: {describe_cpu()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
          f"date: {date.today()}; freeze_embedding={freeze}, "
          f"presence_weight={args.presence_weight:g}, embedding_steps={args.embedding_steps}, steps={args.steps}"
          + (f", mask_reduction={args.mask_reduction}" if args.mask_reduction else "") + ".\n")
    print("| parts (masking, classifier, embedding) | seed | true class | absent class | inside pattern | outside "
          "| filter: true ranked first | filter: absent present | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    timing = training.measure_parts
    try:
        for seed in seeds:
            for code, parts in runs:
                training.measure_parts = lambda *a, parts=parts, **k: parts  # the parts as given, not timed
                start = time.perf_counter()
                explainer = fit_explainer(classifier, train, epochs=100, max_steps=args.steps,
                                          embedding_steps=args.embedding_steps, seed=seed, progress=False,
                                          precision="auto", presence_weight=args.presence_weight, **ENCODER,
                                          # the defaults these rows were measured with, but for those given
                                          **{**EARLIER_DEFAULTS, "freeze_embedding": freeze,
                                             **({"mask_reduction": args.mask_reduction} if args.mask_reduction else {})}
                                          ).eval()
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    masks = explainer(test.images, test.labels)
                    absent = explainer(test.images, (test.labels + 1) % 4)
                    scores = explainer.masking_model.presence(test.images)
                first = (scores.argmax(1) == test.labels).float().mean()
                absent_present = (scores.gather(1, ((test.labels + 1) % 4)[:, None]) > 0).float().mean()
                inside = inside_boxes(test.boxes, *masks.shape[-2:])
                print(f"| {code} | {seed} | {masks.mean():.3f} | {absent.mean():.3f} | {masks[inside].mean():.3f} "
                      f"| {masks[~inside].mean():.3f} | {first:.3f} | {absent_present:.3f} | {seconds:.0f} |", flush=True)
    finally:
        training.measure_parts = timing


if __name__ == "__main__":
    main()
