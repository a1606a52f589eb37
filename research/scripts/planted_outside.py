"""Why do some seeds settle on loose masks? The objective's own value for the learned mask
against tighter masks, on the learned-CNN planted task.

    python benchmarks/planted_outside.py --seeds 0,1,2,3,4 --threads 2

Each seed trains the set-up of ``benchmarks/planted_precision.py --parts bbb --freeze-embedding
--embedding-steps 800 --steps 1800`` (all bf16, the embedding stage's work fixed after 800 steps,
1,000 mask steps) and, on 300 held-out images, describes the true class's mask outside the
planted pattern (mean, median, share of pixels above 0.5: a low floor everywhere or a blob? and,
averaged over the images with each pattern left out, the largest value: a blob in the same place
on every image?),
then scores three masks with the training objective (its default weights), with alternatives
drawn once and shared by all three, blurred ones and random-colour ones apart:

- ``learned``: the explainer's mask;
- ``inside only``: the same mask with everything outside the pattern set to 0;
- ``pattern box``: 1 on the pattern, 0 elsewhere.

A last table gives each class's mean true-class mask per seed (and an absent class's mean mask), and one more the class filter's
spatial gate ``sigmoid(X_ij^T C_c)`` for the true class on the coarsest map: its mean on the cells
that touch the pattern and on the others, and the share of the others above 0.5 (does the gate of
a class whose masks fill the image open everywhere?). ``--start-empty B``: the masking
model starts from masks near empty (the head's second channel biased by ``B``, so that
``|c0| / (|c0| + |c1|)`` begins small), through ``init_from``. ``--gate-weight W``: an experiment,
not a library option: the embedding stage's presence loss gains ``W`` times the true class's mean
gate, over every cell (``--gate-cells all``) or every cell but the image's highest
(``off-max``), to ask the gate to close off the evidence; or, with ``--gate-cells margin``,
``W * softplus(M - (max_ij s_ij - median_ij s_ij))`` of the true class's scores ``s_ij =
X_ij^T C_c`` (``M``: ``--contrast-margin``), which asks for contrast without pulling the
highest cell down. ``--stretch-gate``: another, in the
mask stage: each image's gate becomes ``a_max * (a - a_min) / (a_max - a_min)`` (its highest
cell keeps its level, so an absent class stays shut; its lowest goes to 0), to see whether
more contrast in the gate stops the collapse (the gate table then shows the stretched gate). ``--area-power P``: train (and score) with the
area term's power ``P`` instead of 0.3 (1 is the paper's plain mean, whose pull does not
weaken as the mask fills). ``--area-controller T,G``: the area term weighted per class in the
mask stage, more for a class whose running mean mask is above ``T`` (see :func:`area_controller`).
``--train-embedding``: nothing is fixed after the embedding stage (``fit_explainer``'s default;
every other run here fixes the encoder and class embedding). ``--train-class-filter``: after the embedding stage only the encoder is fixed; the class filter
keeps training in the mask stage, under the mask losses and the presence loss (weight 1), so
the masks' needs can shape its gate (see :func:`fix_encoder_only`). ``--peak-removed W``:
``fit_explainer``'s ``removed_peak_weight=W`` (with ``removed_peak_cells=K`` from
``--peak-window K``): the embedding stage's presence loss gains ``W`` times a second one, on
each image with the cells around the true class's highest score replaced by an alternative
image, whose target is the classifier's own probability for the class there. ``--peak-ramp F``
(an experiment, with ``--peak-removed``): that weight grows linearly from 0 at the first step
to ``W`` at ``F`` times the embedding steps, so the peak means something before it is removed. ``--peak-blur-prob P`` (with
``--peak-removed``): the removed region is replaced by a blurred copy with probability ``P``,
else by a random colour (the library uses 1 since 2026-12-04; the earlier removed-peak tables
used the objective's 0.5, and ``--peak-blur-only`` named the runs with 1).
``--peak-skip-background T`` (with ``--peak-removed``): ``fit_explainer``'s
``removed_peak_skip_background=T``: the second loss leaves out the images whose class the
classifier still gives probability >= ``T`` on the whole image blurred, a class that removing
evidence cannot destroy.

A line before the tables says what the classifier calls the held-out images with the pattern
blurred out (this task's CNN: class 1, p 0.999, on every image).

If ``inside only`` or ``pattern box`` has the lower objective, a loose run stopped in a worse
place than the objective allows (an optimisation problem); if the learned mask is lower, the
objective itself asks for what lies outside the pattern (the classifier needs it).
The area and TV terms are taken on the masks average-pooled by ``mask_reduction``, the
resolution the explainer produces them at in training.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
from datetime import date

import torch
import torch.nn.functional as F

import blackbox_saliency.training as training
from blackbox_saliency import Explainer, fit_explainer
from blackbox_saliency._precision import PartPrecision, describe_cpu
from blackbox_saliency.evidence import alternative_image, remove_evidence
from blackbox_saliency.masking_model import FeatureFilter, MaskingModel
from blackbox_saliency.objective import SaliencyObjective
from blackbox_saliency.testing import PlantedPatterns, inside_boxes, train_pattern_cnn
from blackbox_saliency.training import EARLIER_DEFAULTS


def objective_terms(objective, classifier, images, masks, labels, alternatives, reduction):
    """Mean of each weighted term and of the total, for the given shared alternatives."""
    low = F.avg_pool2d(masks, reduction)
    terms = objective.regulariser_terms(low)
    with torch.no_grad():
        terms.update(objective.classifier_terms(classifier, images, masks, labels, alternatives))
    weights = {"tv": objective.tv_weight, "area": objective.area_weight,
               "preserve": objective.preserve_weight, "destroy": objective.destroy_weight}
    out = {name: (weights[name] * value).mean().item() for name, value in terms.items()}
    out["total"] = sum(out.values())
    return out


def true_class_gate(explainer, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The class filter's gate ``sigmoid(X_ij^T C_c)`` for each image's ``labels``, ``(N, 1, h, w)``."""
    seen = []
    hook = explainer.masking_model.feature_filter.register_forward_hook(
        lambda module, inputs, output: seen.append(output[1].float()))
    try:
        with torch.no_grad():
            explainer(images, labels)
    finally:
        hook.remove()
    return seen[0]


def gate_penalised_embedding_loss(weight: float, cells: str, margin: float = 6.0):
    """``training._embedding_loss`` plus ``weight`` times the labelled class's mean gate
    ``sigmoid(X_ij^T C_c)`` over ``cells`` ("all", or "off-max": all but each image's highest),
    or (``cells="margin"``) times ``softplus(margin - (max - median))`` of its scores ``X_ij^T C_c``."""

    def loss_fn(classifier, model, images, labels, k, settings, shard=training.LOCAL, blur_prob=None):
        images, labels = training._flip_and_select(classifier, images, labels, settings, shard)
        predicted = None
        if training._predictions_present(settings):
            with torch.no_grad():
                predicted = classifier(images).argmax(1)
        masking_model = model.explainer.masking_model
        features = masking_model._features(images)[-1]
        presence = training.presence_loss(masking_model.feature_filter.class_logits(features).float(),
                                          labels, predicted)
        gate = masking_model.feature_filter(features, labels)[1].float().flatten(1)
        if cells == "margin":
            scores = torch.einsum("nchw,nc->nhw", features, masking_model.feature_filter.embeddings(labels)
                                  .to(features.dtype)).float().flatten(1)
            gate_term = F.softplus(margin - (scores.amax(1) - scores.median(1).values))
        elif cells == "off-max":
            keep = torch.ones_like(gate).scatter_(1, gate.argmax(1, keepdim=True), 0.0)
            gate_term = (gate * keep).sum(1) / keep.sum(1)
        else:
            gate_term = gate.mean(1)
        loss = presence + weight * gate_term.mean()
        return loss, {"embed": presence.detach(), "gate": gate_term.mean().detach(), "loss": loss.detach()}, 0

    return loss_fn


def ramped_embedding_loss(embedding_loss, weight: float, ramp_steps: int):
    """``training._embedding_loss`` with ``removed_peak_weight`` growing linearly from 0 at the
    first call to ``weight`` at call ``ramp_steps`` (one call per step in one process)."""
    calls = [0]

    def loss_fn(classifier, model, images, labels, k, settings, shard=training.LOCAL,
                blur_prob=training.REMOVED_PEAK_BLUR_PROB):
        ramped = weight * min(1.0, calls[0] / ramp_steps) if ramp_steps else weight
        calls[0] += 1
        settings = dataclasses.replace(settings, removed_peak_weight=ramped)
        return embedding_loss(classifier, model, images, labels, k, settings, shard, blur_prob)

    return loss_fn


def class_without_pattern(classifier, test) -> str:
    """What the classifier says of the held-out images with the pattern removed (its box grown by
    2 px, replaced by a blurred copy): a class it calls on bare background cannot be destroyed by
    removing evidence, and the removed peak's target for it stays high wherever the peak was."""
    inside = inside_boxes(test.boxes, *test.images.shape[-2:]).float()
    grown = F.max_pool2d(inside, 5, stride=1, padding=2)
    torch.manual_seed(0)
    with torch.no_grad():
        bare = remove_evidence(test.images, 1 - grown, alternative_image(test.images, 1.0))
        probs = classifier(bare).float().softmax(1)
    counts = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).tolist()
    return ("The classifier on the held-out images with the pattern blurred out: mean probability per class "
            + ", ".join(f"{c}: {v:.3f}" for c, v in enumerate(probs.mean(0).tolist()))
            + f"; top class counts {counts}.\n")


def stretch_gate(forward):
    """``FeatureFilter.forward`` with each image's gate stretched to ``a_max * (a - a_min) / (a_max - a_min)``."""

    def stretched_forward(self, features, class_ids):
        _, gate, presence = forward(self, features, class_ids)
        flat = gate.flatten(1)
        high, low = flat.amax(1)[:, None, None, None], flat.amin(1)[:, None, None, None]
        gate = high * (gate - low) / (high - low).clamp_min(1e-6)
        return features * gate, gate, presence

    return stretched_forward


def fix_encoder_only(explainer, encoder: bool = True) -> list:
    """``training._fix_embedding_stage`` freezing the encoder (and its BatchNorm statistics) but
    not the class filter. Used with ``freeze_embedding="class_embedding"``, whose mask stage keeps
    the presence loss, so the filter is trained by it and by the mask losses together."""
    model = explainer.masking_model
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    model.encoder.eval()
    return params


@contextlib.contextmanager
def area_controller(objective: SaliencyObjective, num_classes: int, threshold: float, gain: float,
                    momentum: float = 0.9):
    """A copy of ``objective`` whose area term is weighted per class (an experiment): class
    ``c``'s by ``1 + gain * max(0, m_c - threshold) / (1 - threshold)``, ``m_c`` the running
    mean (``momentum``) of the masks the mask stage has given class ``c`` so far, so a class whose
    masks fill the image is pulled harder than one whose masks are small. The class ids reach the
    area term through the masking model's forward, recorded here."""
    controlled, running, seen = copy.copy(objective), torch.zeros(num_classes), {}
    forward, regulariser = MaskingModel.forward, objective.regulariser_terms

    def recording_forward(self, images, class_ids, class_logits=False):
        seen["ids"] = class_ids
        return forward(self, images, class_ids, class_logits)

    def weighted_terms(masks):
        terms = regulariser(masks)
        ids = seen["ids"].cpu()
        with torch.no_grad():
            means = masks.detach().float().flatten(1).mean(1).cpu()
            for c in ids.unique():
                running[c] = momentum * running[c] + (1 - momentum) * means[ids == c].mean()
        weight = 1 + gain * (running - threshold).clamp_min(0) / (1 - threshold)
        terms["area"] = terms["area"] * weight[ids].to(terms["area"])
        return terms

    controlled.regulariser_terms = weighted_terms
    MaskingModel.forward = recording_forward
    try:
        yield controlled
    finally:
        MaskingModel.forward = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds")
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--embedding-steps", type=int, default=800)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--start-empty", type=float, default=None, metavar="B",
                        help="bias the head's second channel by B at the start (masks begin near empty)")
    parser.add_argument("--gate-weight", type=float, default=None, metavar="W",
                        help="add W x the true class's mean gate to the embedding stage's loss (an experiment)")
    parser.add_argument("--gate-cells", choices=("all", "off-max", "margin"), default="all",
                        help="cells the gate penalty averages over (with --gate-weight)")
    parser.add_argument("--contrast-margin", type=float, default=6.0, metavar="M",
                        help="with --gate-cells margin: the score margin asked between the highest cell and the median")
    parser.add_argument("--area-controller", default=None, metavar="T,G",
                        help="per-class area weight 1 + G * max(0, m_c - T) / (1 - T), m_c class c's running "
                             "mean mask (an experiment)")
    parser.add_argument("--stretch-gate", action="store_true",
                        help="stretch each image's gate between its lowest and highest cell (an experiment)")
    parser.add_argument("--area-power", type=float, default=None, metavar="P",
                        help="the area term's power (default: the objective's, 0.3)")
    parser.add_argument("--train-class-filter", action="store_true",
                        help="fix only the encoder after the embedding stage; the class filter trains on in the "
                             "mask stage (an experiment)")
    parser.add_argument("--train-embedding", action="store_true",
                        help="fix nothing after the embedding stage: the mask stage trains the encoder and class "
                             "embedding too (fit_explainer's default, freeze_embedding=False)")
    parser.add_argument("--peak-removed", type=float, default=None, metavar="W",
                        help="add W x the presence loss on each image with the true class's peak region removed, "
                             "against the classifier's probability there (an experiment)")
    parser.add_argument("--peak-window", type=int, default=3, metavar="K",
                        help="with --peak-removed: the removed region, K x K cells of the coarsest map (odd)")
    parser.add_argument("--peak-ramp", type=float, default=None, metavar="F",
                        help="with --peak-removed: its weight ramps from 0 to W over F x the embedding steps (an "
                             "experiment)")
    parser.add_argument("--peak-skip-background", type=float, default=None, metavar="T",
                        help="with --peak-removed: leave out of it the images whose class the classifier gives "
                             "probability >= T on the whole image blurred (an experiment)")
    parser.add_argument("--peak-blur-prob", type=float, default=None, metavar="P",
                        help="with --peak-removed: replace the removed region by a blurred copy with probability P, "
                             "else a random colour (default: the library's, 1)")
    parser.add_argument("--save", default=None, help="torch.save the held-out images, boxes and each seed's masks here")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as err:
        parser.error(f"--seeds: expected comma-separated ints ({err})")
    for name, value, allowed, wanted in (("--gate-weight", args.gate_weight, lambda v: v >= 0, "a number >= 0"),
                                         ("--contrast-margin", args.contrast_margin, lambda v: True, "a finite number"),
                                         ("--area-power", args.area_power, lambda v: v > 0, "a positive number"),
                                         ("--peak-removed", args.peak_removed, lambda v: v >= 0, "a number >= 0")):
        if value is not None and not (math.isfinite(value) and allowed(value)):
            parser.error(f"{name}: expected {wanted}, got {value!r}")
    if args.peak_window < 1 or args.peak_window % 2 == 0:
        parser.error(f"--peak-window: expected an odd number of cells >= 1, got {args.peak_window}")
    if args.peak_ramp is not None and args.peak_removed is None:
        parser.error("--peak-ramp: give it with --peak-removed W")
    if args.peak_ramp is not None and not 0 <= args.peak_ramp <= 1:
        parser.error(f"--peak-ramp: expected a fraction in [0, 1], got {args.peak_ramp!r}")
    if args.peak_blur_prob is not None and args.peak_removed is None:
        parser.error("--peak-blur-prob: give it with --peak-removed W")
    if args.peak_blur_prob is not None and not 0 <= args.peak_blur_prob <= 1:
        parser.error(f"--peak-blur-prob: expected a probability in [0, 1], got {args.peak_blur_prob!r}")
    if args.peak_skip_background is not None and args.peak_removed is None:
        parser.error("--peak-skip-background: give it with --peak-removed W")
    if args.peak_skip_background is not None and not 0 < args.peak_skip_background <= 1:
        parser.error(f"--peak-skip-background: expected a probability in (0, 1], got {args.peak_skip_background!r}")
    if args.train_embedding and args.train_class_filter:
        parser.error("--train-embedding: give it or --train-class-filter, not both")
    if args.peak_removed is not None and args.gate_weight is not None:
        parser.error("--peak-removed: give it or --gate-weight, not both (the gate penalty's embedding loss leaves the removed peak out)")
    controller = None
    if args.area_controller:
        try:
            controller = tuple(float(v) for v in args.area_controller.split(","))
        except ValueError:
            controller = ()
        if len(controller) != 2 or not 0 <= controller[0] < 1 or controller[1] < 0:
            parser.error(f"--area-controller: expected T,G with 0 <= T < 1 and G >= 0, got {args.area_controller!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    train = PlantedPatterns(4000, size=40, patch=8, noise=0.15, seed=10)
    test = PlantedPatterns(300, size=40, patch=8, noise=0.15, seed=11)
    classifier = train_pattern_cnn(train, steps=400)
    objective = SaliencyObjective() if args.area_power is None else SaliencyObjective(area_power=args.area_power)
    options = f" --start-empty {args.start_empty:g}" if args.start_empty is not None else ""
    if args.gate_weight is not None:
        options += f" --gate-weight {args.gate_weight:g} --gate-cells {args.gate_cells}"
        options += f" --contrast-margin {args.contrast_margin:g}" if args.gate_cells == "margin" else ""
    options += " --stretch-gate" if args.stretch_gate else ""
    options += f" --area-power {args.area_power:g}" if args.area_power is not None else ""
    options += f" --area-controller {args.area_controller}" if args.area_controller else ""
    options += " --train-class-filter" if args.train_class_filter else ""
    options += " --train-embedding" if args.train_embedding else ""
    options += f" --threads {args.threads}" if args.threads else ""
    if args.peak_removed is not None:
        options += f" --peak-removed {args.peak_removed:g} --peak-window {args.peak_window}"
        options += f" --peak-ramp {args.peak_ramp:g}" if args.peak_ramp is not None else ""
        options += f" --peak-blur-prob {args.peak_blur_prob:g}" if args.peak_blur_prob is not None else ""
        options += (f" --peak-skip-background {args.peak_skip_background:g}"
                    if args.peak_skip_background is not None else "")
    print(f"Command: `python benchmarks/planted_outside.py --seeds {args.seeds} --steps {args.steps} "
          f"--embedding-steps {args.embedding_steps}{options}`; machine: {describe_cpu()}, {torch.get_num_threads()} CPU "
          f"threads, torch {torch.__version__}; date: {date.today()}.\n")
    print(class_without_pattern(classifier, test))
    print("| seed | outside: mean / median / share > 0.5 / max of the mean over images | inside | alternative | mask | preserve | destroy "
          "| area | tv | total |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    timing = training.measure_parts
    training.measure_parts = lambda *a, **k: PartPrecision(True, True, True)  # bbb, as planted_precision
    embedding_loss = training._embedding_loss
    if args.gate_weight is not None:
        training._embedding_loss = gate_penalised_embedding_loss(args.gate_weight, args.gate_cells,
                                                                args.contrast_margin)
    fix_stage = training._fix_embedding_stage
    if args.train_class_filter:
        training._fix_embedding_stage = fix_encoder_only
    filter_forward = FeatureFilter.forward
    peak_blur_prob = training.REMOVED_PEAK_BLUR_PROB
    if args.peak_blur_prob is not None:
        training.REMOVED_PEAK_BLUR_PROB = args.peak_blur_prob
    if args.stretch_gate:
        FeatureFilter.forward = stretch_gate(filter_forward)
    saved, gates, absent = {}, {}, {}
    try:
        for seed in seeds:
            start = None
            if args.start_empty is not None:
                torch.manual_seed(seed)
                start = Explainer(4, "small", encoder_kwargs={"widths": [16, 32, 64]})
                with torch.no_grad():
                    start.masking_model.head.bias[1] += args.start_empty
            if args.peak_ramp is not None:  # a new count for each seed's run
                training._embedding_loss = ramped_embedding_loss(embedding_loss, args.peak_removed,
                                                                 round(args.peak_ramp * args.embedding_steps))
            with (area_controller(objective, 4, *controller) if controller else
                  contextlib.nullcontext(objective)) as train_objective:
                explainer = fit_explainer(classifier, train, epochs=100, max_steps=args.steps,
                                          embedding_steps=args.embedding_steps, seed=seed, progress=False,
                                          precision="auto", encoder="small",
                                          freeze_embedding=("class_embedding" if args.train_class_filter
                                                            else not args.train_embedding),
                                          encoder_kwargs={"widths": [16, 32, 64]}, init_from=start,
                                          objective=train_objective, removed_peak_weight=args.peak_removed or 0.0,
                                          removed_peak_cells=args.peak_window,
                                          removed_peak_skip_background=args.peak_skip_background,
                                          # the mask resolution these rows were measured with
                                          mask_reduction=EARLIER_DEFAULTS["mask_reduction"]).eval()
            with torch.no_grad():
                learned = explainer(test.images, test.labels).float()
            inside = inside_boxes(test.boxes, *learned.shape[-2:])
            outside = learned[~inside]
            # mean over images of each pixel where it lies outside that image's pattern
            outside_mean = (learned * ~inside).sum(0) / (~inside).sum(0).clamp_min(1)
            saved[seed] = learned
            with torch.no_grad():  # another class than the one planted: a selective explainer leaves it empty
                absent[seed] = explainer(test.images, (test.labels + 1) % 4).float().flatten(1).mean(1).mean().item()
            gates[seed] = true_class_gate(explainer, test.images, test.labels)
            described = (f"{outside.mean():.3f} / {outside.median():.3f} / {(outside > 0.5).float().mean():.3f} / "
                         f"{outside_mean.max():.3f}",
                         f"{learned[inside].mean():.3f}")
            reduction = explainer.config.mask_reduction
            candidates = {"learned": learned, "inside only": learned * inside, "pattern box": inside.float()}
            for kind, blur_prob in (("blurred", 1.0), ("random colour", 0.0)):
                torch.manual_seed(seed + 100)
                alternatives = (alternative_image(test.images, blur_prob), alternative_image(test.images, blur_prob))
                for name, masks in candidates.items():
                    t = objective_terms(objective, classifier, test.images, masks, test.labels, alternatives,
                                        reduction)
                    print(f"| {seed} | {described[0]} | {described[1]} | {kind} | {name} | {t['preserve']:.3f} | "
                          f"{t['destroy']:.3f} | {t['area']:.3f} | {t['tv']:.3f} | {t['total']:.3f} |", flush=True)
    finally:
        training.measure_parts = timing
        training._embedding_loss = embedding_loss
        training._fix_embedding_stage = fix_stage
        FeatureFilter.forward = filter_forward
        training.REMOVED_PEAK_BLUR_PROB = peak_blur_prob
    # a loose run: one class's masks fill the image (benchmarks' 2026-12-03 finding), or a spread?
    print("\n| seed | share of images with mean mask > 0.5 | " + " | ".join(f"class {c}" for c in range(4))
          + " | an absent class (the next one) |")
    print("| --- | --- |" + " --- |" * 5)
    for seed, masks in saved.items():
        mean = masks.flatten(1).mean(1)
        print(f"| {seed} | {(mean > 0.5).float().mean():.2f} | "
              + " | ".join(f"{mean[test.labels == c].mean():.3f}" for c in range(4)) + f" | {absent[seed]:.3f} |")
    print("\n| seed | class | gate on the pattern's cells | gate elsewhere | share of other cells with gate > 0.5 |")
    print("| --- | --- | --- | --- | --- |")
    for seed, gate in gates.items():
        cells = F.adaptive_max_pool2d(inside_boxes(test.boxes, *test.images.shape[-2:]).float(),
                                      gate.shape[-2:]) > 0
        for c in range(4):
            rows = test.labels == c
            on, off = gate[rows][cells[rows]], gate[rows][~cells[rows]]
            print(f"| {seed} | {c} | {on.mean():.3f} | {off.mean():.3f} | {(off > 0.5).float().mean():.3f} |")
    if args.save:
        torch.save({"images": test.images, "boxes": test.boxes, "labels": test.labels, "masks": saved}, args.save)


if __name__ == "__main__":
    main()
