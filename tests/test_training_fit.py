"""fit_explainer: what it returns and records, what it leaves as it was, reproducibility,
checkpoints and resuming, and the errors of a bad call."""

import logging
import os
import warnings

import pytest
import torch
from torch.utils.data import Subset

from blackbox_saliency import Explainer, explain, fit_explainer
from blackbox_saliency.recipes import get_recipe
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns
from blackbox_saliency.training import build_explainer
from blackbox_saliency.training.stages import stage_ends

from conftest import SMALL, ConstantLogits, tiny_cnn


def recipe(**changes):
    """The small recipe at test size: a tiny encoder, batches of 8, float32 (``"auto"`` times
    the parts, and a loaded machine may choose differently between two runs)."""
    return get_recipe("small").replace(**{"model.encoder_kwargs": SMALL["encoder_kwargs"], "runtime.precision": "fp32",
                                          "schedule.batch_size": 8, **changes})


ONE_STAGE = {"schedule.stages": [{"kind": "masks", "share": 1.0, "filter": "learns"}]}


def fit(classifier=None, data=None, with_recipe=None, **kwargs):
    # the CPU unless a test asks: seeds give bit-identical runs only there
    kwargs = {"steps": 4, "progress": False, "device": "cpu", **kwargs}
    classifier = PatternClassifier(patch=12) if classifier is None else classifier
    data = PlantedPatterns(16, patch=12) if data is None else data  # 2 batches an epoch
    return fit_explainer(classifier, data, recipe() if with_recipe is None else with_recipe, **kwargs)


class Interrupting(torch.nn.Module):
    """The classifier, counting its calls; ``after`` calls it raises KeyboardInterrupt, as Ctrl-C
    would in the middle of a step."""

    def __init__(self, after=None):
        super().__init__()
        self.inner, self.after, self.calls = PatternClassifier(patch=12), after, 0

    def forward(self, x):
        self.calls += 1
        if self.after is not None and self.calls > self.after:
            raise KeyboardInterrupt
        return self.inner(x)


def test_fit_returns_an_eval_explainer_and_leaves_the_classifier_as_it_was():
    torch.manual_seed(0)
    classifier = tiny_cnn(4).train()
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    layouts = []
    classifier[0].register_forward_pre_hook(
        lambda module, args: layouts.append(module.weight.is_contiguous(memory_format=torch.channels_last)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal run: no warning (masks neither empty nor full)
        explainer = fit(classifier)
    assert isinstance(explainer, Explainer) and not explainer.training
    assert explainer.num_classes == 4 and explainer.config.training["steps"] == 4
    assert explainer.config.training["stage_ends"] == [1, 4]  # the small recipe: a quarter embedding
    # the classifier: channels-last and frozen for the run, then as it was
    assert explainer.config.training["channels_last"] is True and any(layouts)
    assert classifier.training and all(p.requires_grad for p in classifier.parameters())
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())
    assert classifier[0].weight.is_contiguous() and classifier[0].weight.device.type == "cpu"
    assert all(p.is_contiguous() for p in explainer.parameters())
    # and training moved the masking model from where it started
    torch.manual_seed(0)  # fit_explainer seeds so before it builds
    untrained = build_explainer(classifier, recipe(), PlantedPatterns(1, patch=12)[0][0], 4, torch.device("cpu"))
    trained = explainer.state_dict()
    assert any(not torch.equal(untrained.state_dict()[k], trained[k]) for k in trained if "upsamplers" in k)


def test_same_seed_same_weights_on_cpu():
    a, b, c = (fit(seed=s, steps=2).state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_and_resume_match_an_uninterrupted_run(tmp_path):
    # 8 steps: the embedding stage ends at 2; both runs are 8 steps long, so the stages are the same
    counting = Interrupting()
    full = fit(counting, seed=3, steps=8).state_dict()
    # interrupted well into the mask stage; every epoch's end (2 steps) is checkpointed
    with pytest.raises(KeyboardInterrupt):
        fit(Interrupting(after=counting.calls * 5 // 8), seed=3, steps=8, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert 2 <= state["step"] < 8 and state["stage_ends"] == [2, 8]
    assert os.listdir(tmp_path) == ["last.pt"]  # atomic writes leave no litter
    resumed = fit(seed=3, steps=8, checkpoint_dir=tmp_path, resume=True)
    assert resumed.config.training["steps"] == 8
    after = resumed.state_dict()
    assert all(torch.allclose(full[k].float(), after[k].float(), atol=1e-6) for k in full)


def test_a_resumed_longer_run_keeps_the_stages_it_started_with(tmp_path):
    fit(seed=3, steps=2, checkpoint_dir=tmp_path)  # stages end at 0 and 2: a quarter of 2 rounds to 0
    longer = fit(seed=3, steps=4, checkpoint_dir=tmp_path, resume=True)
    assert longer.config.training["steps"] == 4
    assert longer.config.training["stage_ends"] == [0, 4]  # only the last stage follows the longer run
    assert stage_ends(recipe().schedule.stages, 4) == [1, 4]  # what a fresh 4-step run would do


def test_resume_with_another_recipe_or_seed_is_refused_and_another_runtime_is_not(tmp_path):
    import json

    fit(seed=3, steps=2, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="resume: .* another recipe or seed"):
        fit(with_recipe=recipe(**{"schedule.lr": 0.5}), seed=3, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="resume: .* another recipe or seed"):
        fit(seed=4, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="resume: .* another recipe or seed"):
        fit(with_recipe=recipe(**{"schedule.stages.1.filter": "fixed"}), seed=3, checkpoint_dir=tmp_path, resume=True)
    # a checkpoint written before class_embedding existed in the config still resumes, and a
    # run's runtime (logging, precision, memory) is no part of what it learns
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    config = json.loads(state["config"])
    del config["class_embedding"], config["class_embedding_features"]
    state["config"] = json.dumps(config)
    torch.save(state, tmp_path / "last.pt")
    resumed = fit(with_recipe=recipe(**{"runtime.log_every": 1, "runtime.max_pixels_per_pass": 4 * 32 * 32}), seed=3,
                  checkpoint_dir=tmp_path, resume=True)
    assert resumed.config.training["steps"] == 4


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    a = fit(seed=5, steps=2, checkpoint_dir=tmp_path, resume=True).state_dict()
    b = fit(seed=5, steps=2).state_dict()
    assert (tmp_path / "last.pt").exists() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupted_checkpoint_is_detected(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="checkpoint_dir: .*last.pt is unreadable or corrupted"):
        fit(checkpoint_dir=tmp_path, resume=True)


def test_nan_loss_stops_with_a_clear_error_and_checkpoints_nothing(tmp_path):
    with pytest.raises(FloatingPointError, match="loss became nan at step 1.*schedule.lr"):
        fit(ConstantLogits([float("nan")] * 4), checkpoint_dir=tmp_path)
    assert not (tmp_path / "last.pt").exists()


def test_the_recipe_its_overrides_and_the_seed_are_recorded(tmp_path):
    given = recipe(**{"objective.area_weight": 6.0})
    explainer = fit(with_recipe=given, seed=7, steps=2)
    training = explainer.config.training
    assert training["recipe"] == "small" and training["seed"] == 7
    assert training["overrides"] == given.overrides
    assert training["overrides"]["objective.area_weight"] == 6.0
    assert "schedule.steps" not in training["overrides"]  # the run's length is an argument, not an override
    assert training["settings"]["schedule"]["steps"] == 2 and training["settings"]["objective"]["area_weight"] == 6.0
    assert explainer.config.objective["area_weight"] == 6.0
    # the recipe's model settings built the explainer
    assert explainer.config.gate_encoder is True and explainer.config.mask_reduction == 2
    explainer.save_pretrained(tmp_path)
    assert Explainer.from_pretrained(tmp_path).config.training["overrides"] == given.overrides
    plain = fit(with_recipe=recipe(**{"model.gate_encoder": False, "model.mask_reduction": 4}), steps=1)
    assert plain.config.gate_encoder is False and plain.config.mask_reduction == 4


@pytest.mark.parametrize("name, where", [
    ("batch_size", "batch_size= is now schedule.batch_size"),
    ("encoder", "encoder= is now model.encoder"),
    ("precision", "precision= is now runtime.precision"),
    ("objective", "objective= is now the objective group"),
    ("freeze_embedding", "freeze_embedding= is now a MaskStage's filter"),
    ("embedding_steps", "embedding_steps= is now an EmbeddingStage's share"),
    ("max_steps", "max_steps= is now the steps= argument"),
    ("selector", "selector= is now sampling.class_source"),
    ("num_classes", "num_classes= is now nothing: it is read from the classifier"),
    ("removed_peak_cells", "removed_peak_cells= was a research setting and is gone"),
    ("bogus", "bogus= is not an argument"),
])
def test_removed_keywords_say_where_each_setting_lives_now(name, where):
    with pytest.raises(TypeError, match=rf"^fit_explainer: {where}.*Settings live in recipes"):
        fit(**{name: 1})


def test_several_removed_keywords_are_named_together():
    with pytest.raises(TypeError, match=r"batch_size= is now schedule\.batch_size; lr= is now schedule\.lr"):
        fit(lr=0.1, batch_size=4)


def test_bad_run_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="steps, epochs: give one of the two, got steps=2 and epochs=1"):
        fit(steps=2, epochs=1)
    with pytest.raises(ValueError, match="steps: expected a positive int, got 0"):
        fit(steps=0)
    with pytest.raises(ValueError, match="epochs: expected a positive int, got True"):
        fit(steps=None, epochs=True)
    with pytest.raises(ValueError, match="resume: needs a checkpoint_dir"):
        fit(resume=True)
    with pytest.raises(ValueError, match=r"schedule\.batch_size: 32 must .* at most the dataset's 16 items"):
        fit(with_recipe=recipe(**{"schedule.batch_size": 32}))
    with pytest.raises(ValueError, match="seed: expected an int"):
        fit(seed="0")
    with pytest.raises(TypeError, match="progress: expected True or False"):
        fit(progress=1)
    with pytest.raises(ValueError, match="recipe: unknown recipe 'fast'"):
        fit(with_recipe="fast")
    with pytest.raises(ValueError, match="device: not a device"):
        fit(device="gpu0")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="checkpoint_dir"):
        fit(checkpoint_dir=blocker / "sub")
    with pytest.raises(TypeError, match="classifier: expected an nn.Module or a callable"):
        fit_explainer("resnet18", PlantedPatterns(8), recipe(), steps=1)
    with pytest.raises(ValueError, match="model.encoder: 'classifier' needs a timm classifier"):
        fit(with_recipe=recipe(**{"model.encoder": "classifier", "model.gate_encoder": False}), steps=1)


def test_prediction_as_class_source_explains_what_the_classifier_predicts(monkeypatch):
    from blackbox_saliency.training import losses

    data = PlantedPatterns(16, patch=12)
    wrong = torch.utils.data.TensorDataset(data.images, torch.zeros(16, dtype=torch.long))  # every label 0
    seen, draw = [], losses.FakeClasses.draw.__func__
    monkeypatch.setattr(losses.FakeClasses, "draw",
                        classmethod(lambda cls, labels, *a, **k: seen.append(labels.clone()) or draw(cls, labels, *a, **k)))
    stages = {"schedule.stages": [{"kind": "masks", "share": 1.0}]}
    by_label = fit(data=wrong, with_recipe=recipe(**stages), steps=2)
    assert torch.cat(seen).eq(0).all()
    assert by_label.config.training["classes_explained"] == [0]
    seen.clear()
    predicted = fit(data=wrong, with_recipe=recipe(**stages, **{"sampling.class_source": "prediction"}), steps=2)
    assert torch.cat(seen).tolist() and set(torch.cat(seen).tolist()) != {0}
    # the matched filter names every planted pattern: the classes are the true labels of the batches
    assert sorted(torch.cat(seen).tolist()) == sorted(data.labels.tolist())
    assert predicted.config.training["settings"]["sampling"]["class_source"] == "prediction"
    assert "classes_explained" not in predicted.config.training  # the classifier chooses: nothing known to restrict


def test_init_from_starts_from_an_explainers_weights(tmp_path, caplog):
    one = recipe(**ONE_STAGE)  # no embedding stage, whose end would copy the gate's encoder over the decoder's
    first = fit(with_recipe=one, seed=0, steps=2)
    first.save_pretrained(tmp_path / "first")
    # lr 1e-12: the optimiser moves the weights by about 1e-12, so they are where init_from put them
    still = recipe(**ONE_STAGE, **{"schedule.lr": 1e-12})
    params = [name for name, _ in first.named_parameters()]
    for source in (first, tmp_path / "first"):
        started = dict(fit(with_recipe=still, seed=5, steps=1, init_from=source).named_parameters())
        assert all(torch.allclose(dict(first.named_parameters())[k], started[k], atol=1e-6) for k in params)
    fresh = dict(fit(with_recipe=still, seed=5, steps=1).named_parameters())
    assert any(not torch.allclose(fresh[k], started[k], atol=1e-3) for k in params)
    recorded = fit(with_recipe=still, steps=1, init_from=first).config.training["init_from"]
    assert recorded == "an Explainer object"
    assert fit(with_recipe=still, steps=1, init_from=tmp_path / "first").config.training["init_from"] == str(tmp_path / "first")
    # another class count: everything but the class embeddings
    with caplog.at_level(logging.INFO, logger="blackbox_saliency.training"):
        five = fit(tiny_cnn(5), with_recipe=still, steps=1, init_from=first)
    assert "init_from: 4 classes, not 5" in caplog.text
    assert five.num_classes == 5
    assert five.masking_model.feature_filter.embedding.weight.shape[0] == 5
    own = dict(five.named_parameters())
    per_class = "masking_model.feature_filter.embedding.weight"
    assert all(torch.allclose(dict(first.named_parameters())[k], own[k], atol=1e-6) for k in params if k != per_class)


def test_init_from_must_fit_the_architecture():
    other = Explainer(num_classes=4, encoder="small", encoder_kwargs={"widths": [8, 16, 24]})
    with pytest.raises(ValueError, match="init_from: its weights do not fit"):
        fit(init_from=other, steps=1)
    with pytest.raises(TypeError, match="init_from: expected an Explainer"):
        fit(init_from=3)


@pytest.mark.parametrize("bias, ended", [((0.0, 1.0), "empty"), ((1.0, 0.0), "full")])
def test_collapsed_masks_are_reported(bias, ended):
    # the mask is |c0| / (|c0| + |c1|) of the head: with its weights at 0 and one bias at 0 it is
    # 0 or 1 everywhere, and the gradient of |x| at 0 is 0: the masks stay collapsed
    one = recipe(**ONE_STAGE)
    classifier = PatternClassifier(patch=12)
    collapsed = build_explainer(classifier, one, PlantedPatterns(1, patch=12)[0][0], 4, torch.device("cpu"))
    with torch.no_grad():
        collapsed.masking_model.head.weight.zero_()
        collapsed.masking_model.head.bias.copy_(torch.tensor(bias))
    with pytest.warns(UserWarning, match=f"masks ended {ended}"):
        fit(classifier, with_recipe=one, steps=2, init_from=collapsed)


def test_the_classes_trained_on_are_recorded_and_explain_warns_for_the_others(tmp_path):
    data = PlantedPatterns(32, patch=12)
    two = Subset(data, (data.labels < 2).nonzero().squeeze(1).tolist())
    assert len(two) >= 8
    explainer = fit(data=two, steps=1)
    assert explainer.config.training["classes_explained"] == [0, 1]
    explainer.save_pretrained(tmp_path)
    loaded = Explainer.from_pretrained(tmp_path)
    classifier, x = PatternClassifier(patch=12), data.images[:2]
    with pytest.warns(UserWarning, match=r"trained on 2 of its 4 classes; 1 asked for here \(3\)"):
        explain(classifier, x, [0, 3], explainer=loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explain(classifier, x, [1, 0], explainer=loaded)
    # every class present: nothing known to restrict
    assert "classes_explained" not in fit(data=data, steps=1).config.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_gpu_with_mixed_precision():
    classifier = PatternClassifier(patch=12)
    explainer = fit(classifier, with_recipe=recipe(**{"runtime.precision": "auto"}), device="cuda", steps=8)
    assert explainer.device.type == "cuda" and explainer.config.training["precision"] == "bf16"
    assert classifier.weight.device.type == "cpu"  # the classifier goes back where it was
    masks = explainer(PlantedPatterns(4, patch=12).images.cuda(), 0)
    assert masks.is_cuda and torch.isfinite(masks).all()
