"""The training stages: what each trains and freezes at its start, what it releases, its loss
and log terms, and where each stage ends."""

import logging

import pytest
import torch

from blackbox_saliency import Explainer, fit_explainer
from blackbox_saliency.encoders import SmallEncoder
from blackbox_saliency.masking_model import FeatureFilter, MaskingModel
from blackbox_saliency.objective import SaliencyObjective
from blackbox_saliency.recipes import EmbeddingStage, MaskStage, Sampling, get_recipe
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns
from blackbox_saliency.training import build_explainer, losses
from blackbox_saliency.training.stages import (Embedding, Freezer, Masks, StageContext, TrainingForward, build_stages,
                                               stage_ends)

from conftest import SMALL

CPU = torch.device("cpu")


def recipe(stages, **changes):
    # the contiguous layout: channels-last (the CPU's default, covered in test_training_fit) is slower to start
    return get_recipe("small").replace(**{"model.encoder_kwargs": SMALL["encoder_kwargs"], "runtime.precision": "fp32",
                                          "runtime.channels_last": False, "schedule.batch_size": 8,
                                          "schedule.stages": stages, **changes})


def fit(with_recipe, steps, **kwargs):
    return fit_explainer(PatternClassifier(patch=12), PlantedPatterns(16, patch=12), with_recipe, steps=steps,
                         progress=False, device="cpu", **kwargs)


def embedding_only(**stage):
    """Two steps of the embedding stage and no more: the mask stage's share rounds to 0 steps."""
    return [{"kind": "embedding", "share": 0.99, **stage}, {"kind": "masks", "share": 0.01}]


def then_masks(mask_filter, **stage):
    """Two steps of the embedding stage, then two mask steps (of 4)."""
    return [{"kind": "embedding", "share": 0.5}, {"kind": "masks", "share": 0.5, "filter": mask_filter, **stage}]


def untrained(with_recipe, seed=0):
    torch.manual_seed(seed)  # as fit_explainer seeds before it builds
    return build_explainer(PatternClassifier(patch=12), with_recipe, PlantedPatterns(1, patch=12)[0][0], 4, CPU)


def keys(state, *prefixes, weights_only=False):
    found = [k for k in state if k.startswith(tuple(f"masking_model.{p}." for p in prefixes))]
    assert found, prefixes
    return [k for k in found if k.endswith("weight")] if weights_only else found


def released(explainer, with_recipe):
    """Every parameter trainable again and no attribute left on the model by a stage."""
    fresh = untrained(with_recipe)
    return (all(p.requires_grad for p in explainer.parameters())
            and set(vars(explainer.masking_model)) == set(vars(fresh.masking_model)))


def test_stage_ends_are_the_running_shares_of_the_run():
    small = get_recipe("small").schedule.stages  # a quarter, then three quarters
    assert stage_ends(small, 4) == [1, 4] and stage_ends(small, 8) == [2, 8] and stage_ends(small, 2) == [0, 2]
    three = (EmbeddingStage(0.2), MaskStage(0.3, resolution=0.5), MaskStage(0.5))
    assert stage_ends(three, 10) == [2, 5, 10] and stage_ends(three, 1) == [0, 0, 1]
    assert stage_ends((MaskStage(1 / 3), MaskStage(2 / 3)), 7) == [2, 7]
    stages = build_stages(three, StageContext(PatternClassifier(), SaliencyObjective(), 4, Sampling()))
    assert [s.name for s in stages] == ["embedding", "masks", "masks"]
    assert stages[1].after_embedding and not stages[2].after_embedding


def test_the_freezer_freezes_and_releases_only_what_it_froze():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 2)).train()
    model[1].eval()  # a part already in eval mode stays so
    model[2].bias.requires_grad_(False)  # and a parameter already fixed stays fixed
    model[0].weight.grad = torch.ones(2, 2)
    freezer = Freezer()
    freezer.freeze(model[0], model[1])
    assert not any(p.requires_grad for p in model[0].parameters()) and not model[0].training
    assert model[0].weight.grad is None  # Adam skips it
    assert model[2].weight.requires_grad and model[2].training
    freezer.release()
    assert all(p.requires_grad for p in model[0].parameters()) and model[0].training
    assert not model[1].training and not model[2].bias.requires_grad
    assert freezer.params == [] and freezer.modes == []


@pytest.mark.parametrize("gate_encoder", [True, False])
def test_each_stage_freezes_at_its_start(gate_encoder):
    base = recipe(then_masks("fixed"), **{"model.gate_encoder": gate_encoder})
    context = StageContext(PatternClassifier(patch=12), base.objective, 4, base.sampling)
    trains = lambda part: all(p.requires_grad for p in part.parameters()) and part.training  # noqa: E731
    fixed = lambda part: not any(p.requires_grad for p in part.parameters()) and not part.training  # noqa: E731
    for spec, expect_fixed in ((EmbeddingStage(1.0), ()),
                               (MaskStage(1.0, filter="learns"), ()),
                               (MaskStage(1.0, filter="fixed"), ("feature_filter", "gate_encoder" if gate_encoder else "encoder")),
                               (MaskStage(1.0, filter="presence_only"), ("encoder",))):
        explainer = untrained(base).train()
        model, freezer = explainer.masking_model, Freezer()
        stage = Embedding(spec, context) if isinstance(spec, EmbeddingStage) else Masks(spec, context)
        stage.start(explainer, freezer, at_beginning=True)
        parts = ["encoder", "feature_filter", "upsamplers", "head"] + (["gate_encoder"] if gate_encoder else [])
        for name in parts:
            assert (fixed if name in expect_fixed else trains)(getattr(model, name)), (spec, name)
        freezer.release()
        assert all(p.requires_grad for p in explainer.parameters()) and all(m.training for m in explainer.modules())


def test_presence_only_starts_the_decoders_encoder_from_the_gates_copy_only_after_an_embedding_stage():
    base = recipe(then_masks("presence_only"))
    context = StageContext(PatternClassifier(patch=12), base.objective, 4, base.sampling)
    for after_embedding, at_beginning, copied in ((True, True, True), (True, False, False), (False, True, False)):
        explainer = untrained(base)
        model = explainer.masking_model
        with torch.no_grad():
            for p in model.gate_encoder.parameters():
                p.add_(1.0)  # as if the embedding stage had trained the gate's copy
        Masks(MaskStage(1.0, filter="presence_only"), context, after_embedding).start(explainer, Freezer(), at_beginning)
        gate, decoder = model.gate_encoder.state_dict(), model.encoder.state_dict()
        # resumed mid-stage (at_beginning False) the checkpoint holds the encoder already
        assert all(torch.equal(gate[k], decoder[k]) for k in gate) == copied


def test_the_embedding_stage_trains_only_the_filter_and_its_encoder():
    for gate_encoder in (True, False):
        given = recipe(embedding_only(), **{"model.gate_encoder": gate_encoder})
        explainer = fit(given, steps=2, seed=0)
        assert explainer.config.training["stage_ends"] == [2, 2]
        start, state = untrained(given).state_dict(), explainer.state_dict()
        changed = {k for k, v in state.items() if v.is_floating_point() and not torch.equal(v, start[k])}
        filter_encoder = "masking_model.gate_encoder." if gate_encoder else "masking_model.encoder."
        assert any(k.startswith("masking_model.feature_filter.") for k in changed)
        assert any(k.startswith(filter_encoder) for k in changed)
        decoder = ("masking_model.upsamplers.", "masking_model.head.") + (("masking_model.encoder.",) if gate_encoder else ())
        assert not any(k.startswith(decoder) for k in changed)  # BatchNorm statistics too
        assert released(explainer, given)


@pytest.mark.parametrize("mask_filter, gate_encoder", [("fixed", False), ("learns", False), ("fixed", True)])
def test_a_fixed_filter_keeps_what_the_embedding_stage_trained(mask_filter, gate_encoder):
    # the same seed replays the same first two steps, the embedding stage's
    stage_only = fit(recipe(embedding_only(), **{"model.gate_encoder": gate_encoder}), steps=2, seed=3).state_dict()
    given = recipe(then_masks(mask_filter), **{"model.gate_encoder": gate_encoder})
    explainer = fit(given, steps=4, seed=3)
    assert explainer.config.training["stage_ends"] == [2, 4]
    after = explainer.state_dict()
    stage_one = keys(after, "feature_filter", "gate_encoder" if gate_encoder else "encoder")
    # the filter and its encoder's weights and BatchNorm statistics, as the stage left them
    assert all(torch.equal(stage_only[k], after[k]) for k in stage_one) == (mask_filter == "fixed")
    assert any(not torch.equal(stage_only[k], after[k]) for k in keys(after, "upsamplers", weights_only=True))
    if gate_encoder:  # the decoder's own encoder learns from the masks
        assert any(not torch.equal(stage_only[k], after[k]) for k in keys(after, "encoder", weights_only=True))
    assert released(explainer, given)


def test_presence_only_fixes_the_decoders_encoder_as_the_gates_copy_and_trains_the_gate_on_presence_only():
    stage_only = fit(recipe(embedding_only()), steps=2, seed=3).state_dict()
    given = recipe(then_masks("presence_only"))
    explainer = fit(given, steps=4, seed=3)
    after = explainer.state_dict()
    # the decoder's encoder, BatchNorm statistics too, is the gate's copy as the embedding stage left it
    decoders = keys(after, "encoder")
    assert all(torch.equal(after[k], stage_only[k.replace(".encoder.", ".gate_encoder.")]) for k in decoders)
    assert any(not torch.equal(after[k], stage_only[k]) for k in decoders)  # it was not that before
    # the presence loss moves the gate; the decoder learns
    assert any(not torch.equal(stage_only[k], after[k]) for k in keys(after, "gate_encoder", "feature_filter", weights_only=True))
    assert any(not torch.equal(stage_only[k], after[k]) for k in keys(after, "upsamplers", weights_only=True))
    assert released(explainer, given)
    # without the presence loss nothing reaches the gate: the mask losses stop at it
    still = fit(recipe(then_masks("presence_only", presence_weight=0.0)), steps=4, seed=3)
    gate = dict(still.named_parameters())
    gate_keys = [k for k in gate if k.startswith(("masking_model.gate_encoder.", "masking_model.feature_filter."))]
    assert gate_keys and all(torch.equal(stage_only[k], gate[k]) for k in gate_keys)
    assert any(not torch.equal(stage_only[k], gate[k]) for k in gate if k.startswith("masking_model.upsamplers."))
    assert released(still, given)


@pytest.mark.parametrize("mask_filter, presence_weight, calls", [
    ("learns", 1.0, 2), ("presence_only", 1.0, 2), ("presence_only", 0.0, 0), ("fixed", 1.0, 0)])
def test_the_mask_stage_scores_every_class_only_while_the_filter_learns(monkeypatch, mask_filter, presence_weight, calls):
    seen = []
    original = FeatureFilter.class_logits
    monkeypatch.setattr(FeatureFilter, "class_logits", lambda self, f: seen.append(1) or original(self, f))
    stages = [{"kind": "masks", "share": 1.0, "filter": mask_filter, "presence_weight": presence_weight}]
    fit(recipe(stages), steps=2)
    assert len(seen) == calls


def test_the_log_shows_only_the_terms_of_the_current_stage(caplog):
    # a stale presence loss from the embedding stage would sit unchanged in every later line
    with caplog.at_level(logging.INFO, logger="blackbox_saliency.training"):
        stages = [{"kind": "embedding", "share": 0.5, "removed_peak_weight": 1.0}, {"kind": "masks", "share": 0.5,
                                                                                   "filter": "fixed"}]
        fit(recipe(stages, **{"runtime.log_every": 1}), steps=4)
    messages = [r.getMessage() for r in caplog.records]
    lines = [m for m in messages if m.startswith("step ")]
    assert len(lines) == 4
    # images/s counted from the run's start: 8 images take more than a millisecond here
    assert 0 < float(lines[0].split("; ")[-1].split(" images/s")[0]) < 8000
    assert all("embed=" in line and "removed_peak=" in line and "area=" not in line for line in lines[:2])
    assert all("area=" in line and "preserve=" in line and "embed=" not in line and "removed_peak=" not in line
               for line in lines[2:])
    assert any(m.startswith("stage 1/2 (embedding, steps 1-2)") for m in messages)
    assert any(m.startswith("stage 2/2 (masks, steps 3-4)") for m in messages)


def test_a_mask_stage_with_its_own_area_weight_uses_it_and_the_next_stage_the_objectives(monkeypatch):
    seen = []
    original = losses.mask_objective
    monkeypatch.setattr("blackbox_saliency.training.stages.mask_objective",
                        lambda objective, *a: seen.append(objective.area_weight) or original(objective, *a))
    stages = [{"kind": "masks", "share": 0.5, "area_weight": 2.0}, {"kind": "masks", "share": 0.5}]
    fit(recipe(stages, **{"objective.area_weight": 7.0}), steps=4)
    assert seen == [2.0, 2.0, 7.0, 7.0]
    with pytest.raises(ValueError, match="stage area_weight"):
        MaskStage(1.0, area_weight=-1.0)


def _context(**sampling):
    return StageContext(PatternClassifier(patch=12), SaliencyObjective(), 4, Sampling(**sampling))


def test_the_class_each_image_is_explained_for():
    data = PlantedPatterns(8, patch=12)
    wrong = (data.labels + 1) % 4
    assert torch.equal(_context().classes(data.images, wrong), wrong)
    assert torch.equal(_context(class_source="prediction").classes(data.images, wrong), data.labels)


def test_the_embedding_stages_loss_and_its_removed_peak_twin():
    base = recipe(embedding_only())
    explainer = untrained(base).train()
    data = PlantedPatterns(4, patch=12)
    forward = TrainingForward(explainer)
    torch.manual_seed(0)
    loss, terms = Embedding(EmbeddingStage(1.0), _context()).loss(forward, data.images, data.labels)
    assert set(terms) == {"embed", "loss"} and torch.equal(loss, terms["embed"]) and loss.requires_grad
    torch.manual_seed(0)
    loss, terms = Embedding(EmbeddingStage(1.0, removed_peak_weight=0.5), _context()).loss(forward, data.images, data.labels)
    assert set(terms) == {"embed", "removed_peak", "loss"}
    assert torch.allclose(loss, terms["embed"] + 0.5 * terms["removed_peak"]) and terms["removed_peak"] > 0


def test_the_removed_peak_is_blurred_whatever_the_objective_says(monkeypatch):
    # a random-colour square shut classes' gates on the planted task (docs/fit.md); the mask
    # stage keeps the objective's own mix (here all random colour)
    seen, original = [], losses.alternative_image
    monkeypatch.setattr(losses, "alternative_image", lambda images, prob, **k: seen.append(prob) or original(images, prob, **k))
    base = recipe(embedding_only())
    context = StageContext(PatternClassifier(patch=12), SaliencyObjective(blur_prob=0.0), 4, base.sampling)
    data = PlantedPatterns(4, patch=12)
    explainer = untrained(base).train()
    Embedding(EmbeddingStage(1.0, removed_peak_weight=1.0), context).loss(TrainingForward(explainer), data.images, data.labels)
    assert seen == [1.0]
    Masks(MaskStage(1.0), context).loss(TrainingForward(explainer), data.images, data.labels)
    assert seen == [1.0, 0.0, 0.0]  # the objective's pair of alternatives


def test_removed_peak_weight_changes_the_embedding_stage_and_is_recorded():
    runs = {w: fit(recipe(embedding_only(removed_peak_weight=w)), steps=2, seed=0) for w in (0.0, 1.0)}
    for weight, explainer in runs.items():
        assert explainer.config.training["settings"]["schedule"]["stages"][0]["removed_peak_weight"] == weight
    embedding = "masking_model.feature_filter.embedding.weight"
    assert not torch.equal(runs[0.0].state_dict()[embedding], runs[1.0].state_dict()[embedding])


def test_filter_on_every_scale_blocks_skip_features_where_the_class_is_not_seen():
    torch.manual_seed(0)
    model = MaskingModel(SmallEncoder(widths=(8, 16, 32)), num_classes=3, class_filter="all").eval()
    with torch.no_grad():
        model.feature_filter.embedding.weight[1] = -100.0  # class 1 is seen nowhere: attention 0
        x = torch.randn(2, 3, 32, 32)
        seen = model(x, torch.tensor([1, 1])).mask
        other = model(x + torch.randn_like(x), torch.tensor([1, 1])).mask
    # with every feature filtered out, the mask no longer depends on the image
    assert torch.allclose(seen, other, atol=1e-4)
    paper = MaskingModel(SmallEncoder(widths=(8, 16, 32)), num_classes=3, class_filter="bottleneck").eval()
    with torch.no_grad():
        paper.feature_filter.embedding.weight[1] = -100.0
        assert not torch.allclose(paper(x, torch.tensor([1, 1])).mask, paper(x + torch.randn_like(x), torch.tensor([1, 1])).mask)


def test_old_configs_load_with_the_papers_filter():
    config = Explainer(4, **SMALL).config.to_dict()
    config.pop("class_filter")
    assert Explainer.from_config(config).masking_model.class_filter == "bottleneck"
