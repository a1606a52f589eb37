import logging
import os
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

from blackbox_saliency import Explainer, explain, fit_explainer, training
from blackbox_saliency.masking_model import FeatureFilter
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns

from conftest import SMALL, ConstantLogits, tiny_cnn


def _fit(classifier=None, data=None, **kwargs):
    # CPU unless a test asks: seeds give bit-identical runs only there; and a fixed precision,
    # since "auto" times the parts and a loaded machine may choose differently between two runs
    kwargs = {**SMALL, "epochs": 1, "batch_size": 8, "progress": False, "device": "cpu", "precision": "fp32", **kwargs}
    data = PlantedPatterns(32, patch=12) if data is None else data
    return fit_explainer(classifier if classifier is not None else PatternClassifier(patch=12), data, **kwargs)


def test_fit_returns_an_eval_explainer_and_leaves_the_classifier_alone():
    classifier = tiny_cnn(4).train()
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    explainer = _fit(classifier)
    assert isinstance(explainer, Explainer) and not explainer.training
    assert explainer.num_classes == 4 and explainer.config.training["steps"] == 4
    assert classifier.training and all(p.requires_grad for p in classifier.parameters())
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())


def test_training_changes_the_masking_model():
    torch.manual_seed(0)
    untrained = Explainer(num_classes=4, **SMALL).state_dict()
    trained = _fit(seed=0).state_dict()
    assert any(not torch.equal(untrained[k], trained[k]) for k in trained if k.endswith("weight"))


def test_same_seed_same_weights_on_cpu():
    a, b, c = _fit(seed=1).state_dict(), _fit(seed=1).state_dict(), _fit(seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_and_resume_match_an_uninterrupted_run(tmp_path):
    # max_steps stands in for an interruption; the embedding stage is given so both runs share it
    full = _fit(seed=3, epochs=2, embedding_steps=2).state_dict()
    _fit(seed=3, epochs=2, embedding_steps=2, max_steps=5, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert (tmp_path / "last.pt").exists()
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]  # atomic writes leave no litter
    resumed = _fit(seed=3, epochs=2, embedding_steps=2, checkpoint_dir=tmp_path, resume=True)
    assert resumed.config.training["steps"] == 8
    assert all(torch.allclose(full[k].float(), resumed.state_dict()[k].float(), atol=1e-5) for k in full)


def test_a_resumed_run_keeps_the_embedding_stage_it_started_with(tmp_path):
    # auto: a quarter of the run; the first command's run is 4 steps (stage 1), the second's 8
    _fit(seed=3, epochs=2, max_steps=4, checkpoint_dir=tmp_path)
    resumed = _fit(seed=3, epochs=2, checkpoint_dir=tmp_path, resume=True)
    assert resumed.config.training["embedding_steps_run"] == 1
    assert _fit(seed=3, epochs=2).config.training["embedding_steps_run"] == 2


def test_resume_with_other_settings_is_refused(tmp_path):
    _fit(seed=3, max_steps=2, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="other settings"):
        _fit(seed=3, lr=0.5, checkpoint_dir=tmp_path, resume=True)


def test_a_checkpoint_written_under_the_old_setting_names_resumes(tmp_path):
    import json

    _fit(seed=3, max_steps=2, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    settings = json.loads(state["settings"])
    settings["selector"], settings["selector_weight"] = settings.pop("class_source"), settings.pop("presence_weight")
    state["settings"] = json.dumps(settings)
    torch.save(state, tmp_path / "last.pt")
    assert _fit(seed=3, checkpoint_dir=tmp_path, resume=True).config.training["steps"] == 4
    with pytest.raises(ValueError, match="other settings"):  # still compared, under the new names
        _fit(seed=3, presence_weight=2.0, checkpoint_dir=tmp_path, resume=True)


def test_corrupted_checkpoint_is_detected(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupted"):
        _fit(checkpoint_dir=tmp_path, resume=True)


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match="loss became"):
        _fit(ConstantLogits([float("nan")] * 4), checkpoint_dir=tmp_path)


@pytest.mark.parametrize(
    "data,match",
    [
        (TensorDataset(torch.randn(0, 3, 32, 32), torch.zeros(0).long()), "empty"),
        (TensorDataset(torch.randint(0, 255, (8, 3, 32, 32)), torch.zeros(8).long()), "float tensors"),
        (TensorDataset(torch.randn(8, 3, 32, 32), torch.zeros(8)), "integer class ids"),
        ([1, 2, 3], "image, label"),
    ],
)
def test_bad_datasets(data, match):
    with pytest.raises((TypeError, ValueError), match=match):
        _fit(data=data)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_classes: given 10"):
        _fit(num_classes=10)
    with pytest.raises(ValueError, match="batch_size"):
        _fit(batch_size=0)
    with pytest.raises(ValueError, match="resume"):
        _fit(resume=True)
    with pytest.raises(TypeError, match="preload: expected True or False"):
        _fit(preload="yes")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="checkpoint_dir"):
        _fit(checkpoint_dir=blocker / "sub")


def test_prediction_as_class_source():
    assert _fit(class_source="prediction").config.training["class_source"] == "prediction"


def _relabelled(data: PlantedPatterns, wrong: torch.Tensor) -> TensorDataset:
    """The planted images with the rows of ``wrong`` given a label the classifier never predicts."""
    labels = torch.where(wrong, (data.labels + 1) % 4, data.labels)
    return TensorDataset(data.images, labels)


def test_correct_as_class_source_learns_only_from_correctly_classified_images(caplog):
    data = PlantedPatterns(32, patch=12)
    every = torch.ones(len(data), dtype=torch.bool)
    # one encoder and a quarter-resolution mask, so that moved() compares like with like
    settings = dict(seed=4, embedding_steps=0, log_every=1, **training.EARLIER_DEFAULTS)

    def moved(explainer):
        torch.manual_seed(4)  # fit_explainer seeds the same way before it builds the explainer
        start = dict(Explainer(num_classes=4, **SMALL).named_parameters())
        return [name for name, p in explainer.named_parameters() if not torch.equal(p, start[name])]

    # the matched filter never predicts these labels: nothing to learn from, no weight moves
    none = _fit(data=_relabelled(data, every), class_source="correct", **settings)
    assert none.config.training["class_source"] == "correct" and moved(none) == []
    # the same labels as the plain label source do train it
    assert moved(_fit(data=_relabelled(data, every), class_source="label", **settings))
    with caplog.at_level(logging.INFO, logger="blackbox_saliency.training"):
        half = _fit(data=_relabelled(data, torch.arange(len(data)) % 2 == 1), class_source="correct", **settings)
    assert moved(half)
    shares = [float(line.split("correct=")[1].split(",")[0]) for line in
              (r.getMessage() for r in caplog.records) if line.startswith("step ")]
    assert len(shares) == 4 and 0.2 < sum(shares) / 4 < 0.8  # about half of the (flipped) images
    # its masks are taught for the labels present, as with "label"
    assert half.config.training.get("classes_explained") is None  # all four classes present
    with pytest.raises(ValueError, match="class_source: expected 'label', 'prediction' or 'correct'"):
        _fit(class_source="labels")


def test_old_argument_names_still_work_with_a_warning():
    with pytest.warns(FutureWarning, match="selector= is now class_source="):
        explainer = _fit(selector="prediction")
    assert explainer.config.training["class_source"] == "prediction"
    with pytest.warns(FutureWarning, match="selector_weight= is now presence_weight="):
        assert _fit(selector_weight=0.5).config.training["presence_weight"] == 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_gpu_with_mixed_precision():
    explainer = _fit(device="cuda", epochs=2)
    assert explainer.device.type == "cuda"
    masks = explainer(PlantedPatterns(4, patch=12).images.cuda(), 0)
    assert masks.is_cuda and torch.isfinite(masks).all()


def test_collapsed_masks_are_reported():
    # a classifier with nothing to find: the area term wins and masks go empty
    with pytest.warns(UserWarning, match="masks ended empty"):
        _fit(ConstantLogits([0.0, 0.0, 0.0, 0.0]), epochs=80, lr=0.01)


def test_init_from_starts_from_an_explainers_weights(tmp_path):
    first = _fit(seed=0)
    first.save_pretrained(tmp_path / "first")
    # lr 0: the optimiser moves nothing, so the weights are exactly where init_from put them; no
    # embedding stage, whose end would start the decoder's encoder from the gate's (a fresh stage)
    for source in (first, tmp_path / "first"):
        started = _fit(seed=5, lr=0.0, embedding_steps=0, init_from=source).state_dict()
        params = {name for name, _ in first.named_parameters()}
        assert all(torch.equal(first.state_dict()[k], started[k]) for k in params)
    fresh = _fit(seed=5, lr=0.0, embedding_steps=0).state_dict()
    assert any(not torch.equal(fresh[k], started[k]) for k in params)
    assert _fit(seed=5, lr=0.0, embedding_steps=0, init_from=first).config.training["init_from"] == "an Explainer object"


def test_init_from_must_fit_the_architecture():
    other = Explainer(num_classes=4, encoder="small", encoder_kwargs={"widths": [8, 16, 24]})
    with pytest.raises(ValueError, match="init_from: its weights do not fit"):
        _fit(init_from=other)
    with pytest.raises(TypeError, match="init_from: expected an Explainer"):
        _fit(init_from=3)


def _settings(explainer):
    training, config = explainer.config.training, explainer.config
    return {"freeze_embedding": training["freeze_embedding"], "removed_peak_weight": training["removed_peak_weight"],
            "gate_encoder": config.gate_encoder, "mask_reduction": config.mask_reduction}


def test_the_small_encoder_trains_with_its_own_defaults_and_each_can_be_given():
    assert _settings(_fit(max_steps=1)) == training.SMALL_ENCODER_DEFAULTS
    assert _settings(_fit(max_steps=1, **training.EARLIER_DEFAULTS)) == training.EARLIER_DEFAULTS
    # a freeze mode that shares one encoder between gate and decoder gets no gate copy
    shared = _settings(_fit(max_steps=1, freeze_embedding=True))
    assert shared == {**training.SMALL_ENCODER_DEFAULTS, "freeze_embedding": True, "gate_encoder": False}
    given = _settings(_fit(max_steps=1, removed_peak_weight=0.5, mask_reduction=4))
    assert given == {**training.SMALL_ENCODER_DEFAULTS, "removed_peak_weight": 0.5, "mask_reduction": 4}


def test_other_encoders_keep_the_earlier_defaults():
    from blackbox_saliency.encoders import SmallEncoder

    module = SmallEncoder(widths=(8, 16, 32), layers_per_block=1)  # handed in as a module: frozen
    assert _settings(_fit(max_steps=1, encoder=module, encoder_kwargs=None)) == training.EARLIER_DEFAULTS


def test_fine_tuning_builds_the_architecture_it_starts_from():
    earlier = Explainer(num_classes=4, **SMALL)  # mask_reduction 4, one encoder: built before the defaults
    tuned = _fit(max_steps=1, embedding_steps=0, init_from=earlier)
    assert (tuned.config.mask_reduction, tuned.config.gate_encoder) == (4, False)


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_embedding_keeps_what_the_embedding_stage_trained(freeze):
    # 2 embedding steps, then 2 mask steps; the same seed replays the same first 2 steps
    stage_only = _fit(seed=3, embedding_steps=2, max_steps=2, freeze_embedding=freeze).state_dict()
    explainer = _fit(seed=3, embedding_steps=2, max_steps=4, freeze_embedding=freeze)
    after = explainer.state_dict()
    stage_one = [k for k in after if k.startswith(("masking_model.encoder.", "masking_model.feature_filter."))]
    decoder = [k for k in after if k.startswith("masking_model.upsamplers.") and k.endswith("weight")]
    assert stage_one and decoder
    # encoder weights and BatchNorm statistics, and the class embedding, as the stage left them
    assert all(torch.equal(stage_only[k], after[k]) for k in stage_one) == freeze
    assert any(not torch.equal(stage_only[k], after[k]) for k in decoder)
    assert all(p.requires_grad for p in explainer.parameters())  # frozen for training only


def test_freeze_embedding_class_embedding_fixes_the_filter_but_trains_the_encoder(monkeypatch):
    # no removed peak: its loss scores the classes too, and the count below is the presence loss's
    common = dict(seed=3, embedding_steps=2, freeze_embedding="class_embedding", removed_peak_weight=0.0)
    stage_only = _fit(max_steps=2, **common).state_dict()
    calls = []
    original = FeatureFilter.class_logits
    monkeypatch.setattr(FeatureFilter, "class_logits", lambda self, f: calls.append(1) or original(self, f))
    explainer = _fit(max_steps=4, **common)
    after = explainer.state_dict()
    embedding = [k for k in after if k.startswith("masking_model.feature_filter.")]
    encoder = [k for k in after if k.startswith("masking_model.encoder.") and k.endswith("weight")]
    assert embedding and encoder
    assert all(torch.equal(stage_only[k], after[k]) for k in embedding)
    assert any(not torch.equal(stage_only[k], after[k]) for k in encoder)
    assert len(calls) == 4  # the presence loss still trains the encoder in the mask stage
    assert all(p.requires_grad for p in explainer.parameters())
    assert explainer.config.training["freeze_embedding"] == "class_embedding"


def test_a_gate_encoder_is_fixed_with_the_filter_while_the_decoders_encoder_trains_on():
    # 2 embedding steps train the gate's encoder; the decoder's starts from it and trains on
    stage_only = _fit(seed=3, embedding_steps=2, max_steps=2, freeze_embedding=True, gate_encoder=True)
    explainer = _fit(seed=3, embedding_steps=2, max_steps=4, freeze_embedding=True, gate_encoder=True)
    before, after = stage_only.state_dict(), explainer.state_dict()
    gate = [k for k in after if k.startswith(("masking_model.gate_encoder.", "masking_model.feature_filter."))]
    decoders = [k for k in after if k.startswith("masking_model.encoder.") and k.endswith("weight")]
    assert gate and decoders
    assert all(torch.equal(before[k], after[k]) for k in gate)
    # the embedding stage trained only the gate's copy (the two start equal)
    assert any(not torch.equal(before[k], before[k.replace(".encoder.", ".gate_encoder.")]) for k in decoders)
    # and the mask stage moved it away from the gate's copy it started as
    assert any(not torch.equal(after[k], after[k.replace(".encoder.", ".gate_encoder.")]) for k in decoders)
    assert explainer.config.gate_encoder is True


def test_from_mask_losses_trains_the_gate_on_the_presence_loss_only():
    def gate_weights(explainer):
        model = explainer.masking_model
        return [p.detach().clone() for part in (model.gate_encoder, model.feature_filter) for p in part.parameters()]

    common = dict(seed=3, embedding_steps=2, gate_encoder=True, freeze_embedding="from_mask_losses")
    stage_only = gate_weights(_fit(max_steps=2, **common))
    # without the presence loss in the mask stage nothing reaches the gate: the masks' gradient stops there
    still = _fit(max_steps=4, presence_weight=0.0, **common)
    assert all(torch.equal(a, b) for a, b in zip(stage_only, gate_weights(still)))
    assert not still.masking_model.detach_gate  # a later fine-tuning is not affected
    # with it the gate trains on
    moved = gate_weights(_fit(max_steps=4, **common))
    assert any(not torch.equal(a, b) for a, b in zip(stage_only, moved))
    with pytest.raises(TypeError, match="freeze_embedding"):
        _fit(max_steps=1, freeze_embedding="from_masks")


def test_decoder_encoder_fixes_the_decoders_copy_and_trains_the_gate_on_the_presence_loss():
    common = dict(seed=3, embedding_steps=2, gate_encoder=True, freeze_embedding="decoder_encoder")
    before = _fit(max_steps=2, **common).state_dict()
    explainer = _fit(max_steps=4, **common)
    after = explainer.state_dict()
    decoders = [k for k in after if k.startswith("masking_model.encoder.")]
    gate = [k for k in after if k.startswith("masking_model.gate_encoder.") and k.endswith("weight")]
    upsamplers = [k for k in after if k.startswith("masking_model.upsamplers.") and k.endswith("weight")]
    assert decoders and gate and upsamplers
    # the decoder's copy, BatchNorm statistics too, is the gate's as the stage left it
    assert all(torch.equal(after[k], before[k.replace(".encoder.", ".gate_encoder.")]) for k in decoders)
    assert any(not torch.equal(before[k], after[k]) for k in gate)  # the presence loss moves the gate's
    assert any(not torch.equal(before[k], after[k]) for k in upsamplers)
    assert all(p.requires_grad for p in explainer.parameters()) and not explainer.masking_model.detach_gate
    # without the presence loss nothing the stage trained moves
    still = _fit(max_steps=4, presence_weight=0.0, **common).state_dict()
    assert all(torch.equal(before[k], still[k]) for k in gate)


def test_decoder_skips_trains_the_decoders_copy_through_the_skip_connections_only():
    common = dict(seed=3, embedding_steps=2, gate_encoder=True, freeze_embedding="decoder_skips")
    before = _fit(max_steps=2, **common).state_dict()
    explainer = _fit(max_steps=4, **common)
    after = explainer.state_dict()
    last = len(explainer.masking_model.encoder.blocks) - 1
    weights = [k for k in after if k.startswith("masking_model.encoder.blocks.") and k.endswith("weight")]
    deepest = [k for k in weights if k.startswith(f"masking_model.encoder.blocks.{last}.")]
    finer = [k for k in weights if k not in deepest]
    assert deepest and finer
    gate = lambda k: before[k.replace(".encoder.", ".gate_encoder.")]  # noqa: E731  the copy's start
    # the coarsest block feeds only the filter, detached: no gradient moves it; the finer ones learn
    assert all(torch.equal(after[k], gate(k)) for k in deepest)
    assert any(not torch.equal(after[k], gate(k)) for k in finer)
    assert not explainer.masking_model.detach_bottleneck  # a later fine-tuning is not affected


def test_decoder_encoder_steps_lets_the_decoders_copy_learn_first_then_fixes_it(tmp_path):
    common = dict(seed=3, epochs=2, embedding_steps=2, gate_encoder=True, freeze_embedding="decoder_encoder",
                  decoder_encoder_steps=2)
    stage_end = _fit(max_steps=2, **common).state_dict()
    learnt = _fit(max_steps=4, **common).state_dict()  # 2 mask steps: the copy learnt in both
    explainer = _fit(max_steps=6, **common)
    after = explainer.state_dict()
    decoders = [k for k in after if k.startswith("masking_model.encoder.")]
    assert decoders
    # it moved away from the gate's copy as the stage left it, then stayed (statistics too)
    assert any(not torch.equal(learnt[k], stage_end[k.replace(".encoder.", ".gate_encoder.")]) for k in decoders)
    assert all(torch.equal(after[k], learnt[k]) for k in decoders)
    assert all(p.requires_grad for p in explainer.parameters())
    # interrupted after the first mask step and resumed, it is fixed at the same step
    _fit(max_steps=3, checkpoint_dir=tmp_path, checkpoint_every=1, **common)
    resumed = _fit(max_steps=6, checkpoint_dir=tmp_path, resume=True, **common).state_dict()
    assert all(torch.allclose(after[k].float(), resumed[k].float(), atol=1e-5) for k in after)
    with pytest.raises(ValueError, match="decoder_encoder_steps"):
        _fit(max_steps=1, decoder_encoder_steps=-1, freeze_embedding="decoder_encoder", gate_encoder=True)
    with pytest.raises(ValueError, match="decoder_encoder_steps: .*freeze_embedding='from_mask_losses'"):
        _fit(max_steps=1, decoder_encoder_steps=2, freeze_embedding="from_mask_losses", gate_encoder=True)


def test_freeze_embedding_is_a_bool_or_a_mode():  # its defaults: test_the_small_encoder_trains_with_its_own_defaults...
    with pytest.raises(TypeError, match="freeze_embedding"):
        _fit(max_steps=1, freeze_embedding="yes")


def test_freeze_embedding_stops_scoring_every_class_in_the_mask_stage(monkeypatch):
    # after the embedding stage nothing the presence loss reaches can train: no all-class scores
    calls = []
    original = FeatureFilter.class_logits
    monkeypatch.setattr(FeatureFilter, "class_logits", lambda self, f: calls.append(1) or original(self, f))
    _fit(embedding_steps=0, max_steps=2, freeze_embedding=False)
    assert len(calls) == 2
    calls.clear()
    _fit(embedding_steps=0, max_steps=2, freeze_embedding=True)
    assert not calls



def test_the_log_shows_only_the_terms_of_the_current_stage(caplog):
    # a stale presence loss from the embedding stage would sit unchanged in every later line
    with caplog.at_level(logging.INFO, logger="blackbox_saliency.training"):
        _fit(embedding_steps=2, max_steps=4, freeze_embedding=True, log_every=1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 4
    assert all("embed=" in line and "area=" not in line for line in lines[:2])
    assert all("embed=" not in line and "area=" in line for line in lines[2:])


def test_the_classes_trained_on_are_recorded_and_explain_warns_for_the_others(tmp_path):
    data = PlantedPatterns(32, patch=12)
    two = torch.utils.data.Subset(data, (data.labels < 2).nonzero().squeeze(1).tolist())
    explainer = _fit(data=two)
    assert explainer.config.training["classes_explained"] == [0, 1]
    explainer.save_pretrained(tmp_path)
    loaded = Explainer.from_pretrained(tmp_path)
    classifier, x = PatternClassifier(patch=12), data.images[:2]
    with pytest.warns(UserWarning, match=r"trained on 2 of its 4 classes; 1 asked for here \(3\)"):
        explain(classifier, x, [0, 3], explainer=loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explain(classifier, x, [1, 0], explainer=loaded)
    # every class present, or the class chosen by the classifier: nothing known to restrict
    assert "classes_explained" not in _fit(data=data).config.training
    assert "classes_explained" not in _fit(data=two, class_source="prediction").config.training
    assert "classes_explained" not in _fit(data=two, presence_targets="class_and_prediction").config.training
    labels = torch.tensor([2, 0, 2, 1])
    tensors = TensorDataset(torch.zeros(4, 3, 8, 8), labels)
    assert torch.equal(training._dataset_labels(torch.utils.data.Subset(tensors, [3, 0])), torch.tensor([1, 2]))
    assert training._dataset_labels([(torch.zeros(3, 8, 8), 0)]) is None


def test_a_checkpoint_written_before_class_embedding_existed_resumes(tmp_path):
    import json

    _fit(seed=3, max_steps=2, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    config = json.loads(state["config"])
    del config["class_embedding"], config["class_embedding_features"]
    state["config"] = json.dumps(config)
    torch.save(state, tmp_path / "last.pt")
    assert _fit(seed=3, checkpoint_dir=tmp_path, resume=True).config.training["steps"] == 4
