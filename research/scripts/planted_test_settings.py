"""The planted-evidence tests' own measurements (tests/test_planted_evidence.py: the matched filter
and the learned CNN, 400 embedding-stage steps then 1,000 mask steps) under the library's defaults
and under candidate defaults, over several seeds: what a change of defaults would do to them.

    python benchmarks/planted_test_settings.py --seeds 0,1,2 --threads 2

Prints a markdown table: hit rate (mask box IoU > 0.5 with the pattern), mean mask for the true and
an absent class, mask inside / outside the pattern, and the classifier's probability of the class
with the mask kept and removed. The tests' thresholds: hit rate >= 0.65 (matched filter); absent
<= 0.05 and <= a fifth of the true class, inside > 0.5 and outside < 0.1 (learned CNN).
"""

import argparse
import shlex
import time
from datetime import date

import torch

from blackbox_saliency import fit_explainer
from blackbox_saliency._precision import describe_cpu
from blackbox_saliency.training import EARLIER_DEFAULTS
from blackbox_saliency.testing import (PatternClassifier, PlantedPatterns, inside_boxes, mask_boxes, paired_box_iou,
                                       train_pattern_cnn)

ENCODER = {"encoder": "small", "encoder_kwargs": {"widths": [16, 32, 64]}}
# each setting over fit_explainer's defaults before 2026-12-06 (EARLIER_DEFAULTS), as it was measured,
# but the library's defaults as they are now (LIBRARY_DEFAULTS)
LIBRARY_DEFAULTS = "library defaults"
CONFIGS = {
    "defaults before 2026-12-06": {},
    LIBRARY_DEFAULTS: {},
    "freeze_embedding=True, removed_peak_weight=1": {"freeze_embedding": True, "removed_peak_weight": 1.0},
    "gate_encoder=True, freeze_embedding=True": {"gate_encoder": True, "freeze_embedding": True},
    "gate_encoder=True, freeze_embedding='from_mask_losses'": {"gate_encoder": True,
                                                               "freeze_embedding": "from_mask_losses"},
    "gate_encoder=True, freeze_embedding='from_mask_losses', removed_peak_weight=1": {
        "gate_encoder": True, "freeze_embedding": "from_mask_losses", "removed_peak_weight": 1.0},
    "gate_encoder=True, freeze_embedding='decoder_encoder', removed_peak_weight=1": {
        "gate_encoder": True, "freeze_embedding": "decoder_encoder", "removed_peak_weight": 1.0},
    # the decoder's copy learns for the first half of the 1,000 mask steps, then stays fixed
    "gate_encoder=True, freeze_embedding='decoder_encoder', decoder_encoder_steps=500, removed_peak_weight=1": {
        "gate_encoder": True, "freeze_embedding": "decoder_encoder", "decoder_encoder_steps": 500,
        "removed_peak_weight": 1.0},
    # the mask losses reach the decoder's copy through the skip connections only
    "gate_encoder=True, freeze_embedding='decoder_skips', removed_peak_weight=1": {
        "gate_encoder": True, "freeze_embedding": "decoder_skips", "removed_peak_weight": 1.0},
    "gate_encoder=True, freeze_embedding=True, removed_peak_weight=1": {"gate_encoder": True, "freeze_embedding": True,
                                                                       "removed_peak_weight": 1.0},
    # the fixed copy with the CIFAR-10 recipe's mask resolution (hub/train_cifar10.py MASK_REDUCTION):
    # 2 px mask cells, not 4, on these 32 and 40 px images; spelled out, the library's defaults for
    # encoder="small" since 2026-12-06
    "gate_encoder=True, freeze_embedding='decoder_encoder', removed_peak_weight=1, mask_reduction=2": {
        "gate_encoder": True, "freeze_embedding": "decoder_encoder", "removed_peak_weight": 1.0, "mask_reduction": 2},
}

# the name the first row had while those were the library's defaults (docs/results' commands use it)
ALIASES = {"defaults": "defaults before 2026-12-06"}
# the library's defaults before and since the small encoder's changed (docs/fit.md)
DEFAULT_CONFIGS = ("defaults before 2026-12-06", LIBRARY_DEFAULTS)


def settings_of(name: str) -> dict:
    """fit_explainer's arguments for the setting called ``name`` (or its old name)."""
    name = ALIASES.get(name, name)
    return {} if name == LIBRARY_DEFAULTS else {**EARLIER_DEFAULTS, **CONFIGS[name]}


def _scores(explainer, test: PlantedPatterns, classifier) -> dict[str, float]:
    with torch.no_grad():
        masks = explainer(test.images, test.labels)
        absent = explainer(test.images, (test.labels + 1) % 4)
        inside = inside_boxes(test.boxes, *masks.shape[-2:])

        def prob(images):
            return classifier(images).softmax(1).gather(1, test.labels.view(-1, 1)).mean().item()

        return {"hit rate": (paired_box_iou(mask_boxes(masks), test.boxes) > 0.5).float().mean().item(),
                "true": masks.mean().item(), "absent": absent.mean().item(),
                "inside": masks[inside].mean().item(), "outside": masks[~inside].mean().item(),
                "kept": prob(test.images * masks), "removed": prob(test.images * (1 - masks))}


def _shell_quoted(value: str) -> str:
    """``value`` as one shell word: in double quotes where that is safe, which reads better
    than shlex's quoting of the single quotes the settings contain."""
    return f'"{value}"' if not set(value) & set('"$`\\!') else shlex.quote(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1400, help="all steps, the embedding stage's included")
    parser.add_argument("--embedding-steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--configs", default=";".join(DEFAULT_CONFIGS), help=f"among {list(CONFIGS)}, separated by ';'")
    parser.add_argument("--learned-precision", choices=["bf16", "fp32"], default="bf16",
                        help="the learned-CNN task's training precision (the test's: bf16 autocast)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    configs = [c.strip() for c in args.configs.split(";")]
    unknown = [c for c in configs if ALIASES.get(c, c) not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; known: {list(CONFIGS)}")
    # the tests' data and classifiers (tests/test_planted_evidence.py)
    matched = (PlantedPatterns(4000, patch=12, seed=0), PlantedPatterns(200, patch=12, seed=1), PatternClassifier(patch=12))
    train = PlantedPatterns(4000, size=40, patch=8, noise=0.15, seed=10)
    learned = (train, PlantedPatterns(300, size=40, patch=8, noise=0.15, seed=11), train_pattern_cnn(train, steps=400))
    tasks = {"matched filter": (matched, {}), "learned CNN": (learned, {"precision": args.learned_precision})}

    print(f"Command: `python benchmarks/planted_test_settings.py --seeds {args.seeds} --steps {args.steps} "
          f"--embedding-steps {args.embedding_steps}{f' --threads {args.threads}' if args.threads else ''}"
          f"{f' --configs {_shell_quoted(args.configs)}' if args.configs != parser.get_default('configs') else ''}"
          f"{f' --learned-precision {args.learned_precision}' if args.learned_precision != 'bf16' else ''}`; machine: "
          f"{describe_cpu()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; date: {date.today()}.\n")
    print("| task | seed | settings | hit rate | true | absent | inside / outside | p kept / removed | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for seed in seeds:
        for name in configs:
            for task, ((train_set, test_set, classifier), options) in tasks.items():
                start = time.perf_counter()
                explainer = fit_explainer(classifier, train_set, epochs=100, max_steps=args.steps,
                                          embedding_steps=args.embedding_steps, seed=seed, progress=False,
                                          **ENCODER, **options, **settings_of(name))
                seconds = time.perf_counter() - start
                s = _scores(explainer, test_set, classifier)
                print(f"| {task} | {seed} | {ALIASES.get(name, name)} | {s['hit rate']:.2f} | {s['true']:.3f} | {s['absent']:.3f} | "
                      f"{s['inside']:.2f} / {s['outside']:.3f} | {s['kept']:.3f} / {s['removed']:.3f} | {seconds:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
