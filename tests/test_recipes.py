"""Recipes: the registry, "auto", replace() by group or dotted path with recorded overrides,
the run's length, JSON, and bad values named by their dotted setting."""

import dataclasses
import json
import logging

import pytest
import torch

from blackbox_saliency import recipes
from blackbox_saliency.objective import SaliencyObjective
from blackbox_saliency.recipes import (EmbeddingStage, MaskStage, Recipe, Schedule, get_recipe, list_recipes,
                                       register_recipe, resolve_recipe)

from conftest import tiny_cnn


def test_the_named_recipes_are_registered_and_each_call_gives_a_fresh_equal_one():
    assert list_recipes() == ["cifar", "paper", "small", "timm"]
    for name in list_recipes():
        recipe = get_recipe(name)
        assert isinstance(recipe, Recipe) and recipe.name == name and recipe.overrides == {}
        assert get_recipe(name) == recipe
    with pytest.raises(ValueError, match=r"unknown recipe 'nope'; known: \['auto', 'cifar', 'paper', 'small', 'timm'\]"):
        get_recipe("nope")


def test_register_recipe_adds_a_name_and_refuses_a_taken_one(monkeypatch):
    monkeypatch.setattr(recipes, "_REGISTRY", dict(recipes._REGISTRY))  # leave the real registry as it was

    @register_recipe
    def _mine():
        return Recipe(name="mine", schedule=Schedule(steps=10, lr=3e-4))

    assert "mine" in list_recipes() and get_recipe("mine").schedule.steps == 10
    with pytest.raises(ValueError, match="'mine' is already a recipe name"):
        register_recipe(_mine)
    with pytest.raises(ValueError, match="'auto' is already a recipe name"):
        register_recipe(lambda: Recipe(name="auto"))
    with pytest.raises(ValueError, match="'small' is already"):
        register_recipe(lambda: Recipe(name="small"))


def test_auto_picks_timm_for_a_timm_classifier_with_a_linear_head_and_small_otherwise(caplog):
    import timm

    with caplog.at_level(logging.INFO, logger="blackbox_saliency.recipes"):
        assert resolve_recipe("auto", timm.create_model("resnet18", pretrained=False, num_classes=5)).name == "timm"
    assert "picked 'timm'" in caplog.text
    # a timm model without a head, and a plain module with one: not what "timm" needs
    assert resolve_recipe("auto", timm.create_model("resnet18", pretrained=False, num_classes=0)).name == "small"
    assert resolve_recipe("auto", tiny_cnn(5)).name == "small"
    assert resolve_recipe("auto", lambda x: x.mean((2, 3))).name == "small"
    # a name or a Recipe is taken as it is, whatever the classifier
    assert resolve_recipe("cifar", tiny_cnn(5)).name == "cifar"
    given = get_recipe("paper").replace(**{"schedule.lr": 0.01})
    assert resolve_recipe(given, tiny_cnn(5)) is given
    with pytest.raises(ValueError, match="recipe: expected a recipe name or a Recipe"):
        resolve_recipe(3, tiny_cnn(5))


def test_replace_by_group_dict_and_dotted_path_with_a_stage_index():
    small = get_recipe("small")
    recipe = small.replace(objective={"area_weight": 12.0, "tv_weight": 2.0},
                           **{"schedule.stages.1.resolution": 0.5, "model.encoder_kwargs": {"widths": [8, 16]}})
    assert recipe.objective.area_weight == 12.0 and recipe.objective.tv_weight == 2.0
    assert recipe.schedule.stages[1] == MaskStage(0.75, filter="presence_only", resolution=0.5)
    assert recipe.schedule.stages[0] == small.schedule.stages[0]
    assert recipe.model.encoder_kwargs == {"widths": [8, 16]}
    assert recipe.overrides == {"objective.area_weight": 12.0, "objective.tv_weight": 2.0,
                                "schedule.stages.1.resolution": 0.5, "model.encoder_kwargs": {"widths": [8, 16]}}
    # the original is untouched
    assert small.objective.area_weight == 8.0 and small.schedule.stages[1].resolution == 1.0 and small.overrides == {}
    # a whole stage by its index, as a dict with its kind; a whole group as an object
    staged = small.replace(**{"schedule.stages.0": {"kind": "embedding", "share": 0.25, "resolution": 0.5}})
    assert staged.schedule.stages[0] == EmbeddingStage(0.25, resolution=0.5)
    assert staged.overrides == {"schedule.stages.0": {"kind": "embedding", "share": 0.25, "resolution": 0.5}}
    paper = small.replace(objective=SaliencyObjective.paper())
    assert paper.objective == SaliencyObjective.paper() and paper.overrides == {"objective": SaliencyObjective.paper().to_dict()}


def test_overrides_accumulate_and_record_only_changes():
    small = get_recipe("small")
    assert small.replace(**{"schedule.batch_size": 64, "objective.area_weight": 8.0}).overrides == {}  # its own values
    assert small.replace(objective={"area_weight": 8.0}).overrides == {}
    once = small.replace(**{"schedule.batch_size": 16})
    twice = once.replace(**{"sampling.flip": False, "schedule.batch_size": 16})
    assert twice.overrides == {"schedule.batch_size": 16, "sampling.flip": False}
    # a stage set to what it already is is no change either
    assert small.replace(**{"schedule.stages.1.filter": "presence_only"}).overrides == {}


def test_a_runs_length_is_steps_or_epochs():
    small = get_recipe("small")
    assert (small.schedule.steps, small.schedule.epochs) == (None, 20)
    by_steps = small.replace(**{"schedule.steps": 100})
    assert (by_steps.schedule.steps, by_steps.schedule.epochs) == (100, None)
    back = by_steps.replace(schedule={"epochs": 3})
    assert (back.schedule.steps, back.schedule.epochs) == (None, 3)
    with pytest.raises(ValueError, match="schedule: give steps or epochs, one of the two"):
        Schedule(steps=10, epochs=2)
    with pytest.raises(ValueError, match="schedule: give steps or epochs, one of the two"):
        Schedule()
    with pytest.raises(ValueError, match="schedule.epochs.*give steps or epochs"):
        small.replace(**{"schedule.epochs": None})


def test_json_round_trip_of_every_recipe_and_a_changed_one():
    for name in list_recipes():
        recipe = get_recipe(name)
        assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    changed = get_recipe("cifar").replace(**{"sampling.crop_scale": (0.5, 0.9), "schedule.stages.1.filter": "learns",
                                             "model.encoder_kwargs": {"widths": [8, 16, 32]}})
    plain = changed.to_dict()
    assert plain["schedule"]["stages"][0]["kind"] == "embedding" and plain["sampling"]["crop_scale"] == [0.5, 0.9]
    again = Recipe.from_dict(json.loads(json.dumps(plain)))
    assert again == changed and again.overrides == changed.overrides and again.name == "cifar"
    with pytest.raises(ValueError, match=r"recipe: unknown setting\(s\) \['bogus'\]"):
        Recipe.from_dict({**plain, "bogus": 1})
    with pytest.raises(ValueError, match=r"schedule: unknown setting\(s\) \['max_steps'\]"):
        Recipe.from_dict({**plain, "schedule": {**plain["schedule"], "max_steps": 3}})
    with pytest.raises(ValueError, match=r"stage masks: unknown setting\(s\) \['freeze'\]"):
        Recipe.from_dict({**plain, "schedule": {**plain["schedule"], "stages": [{"kind": "masks", "share": 1.0,
                                                                                 "freeze": True}]}})


@pytest.mark.parametrize("path, value, expected", [
    ("schedule.batch_size", 0, "an int >= 1"),
    ("schedule.lr", -1.0, "a number in"),
    ("schedule.steps", 2.5, "an int >= 1"),
    ("model.mask_reduction", "4", "an int >= 1"),
    ("model.class_filter", "skips", "one of"),
    ("model.gate_encoder", "yes", "True or False"),
    ("runtime.precision", "fp16", "one of"),
    ("runtime.preload", "yes", "True or False"),
    ("runtime.max_pixels_per_pass", 0, "an int >= 1 or None"),
    ("sampling.class_source", "correct", "one of"),  # a research setting, gone
    ("sampling.fake_label_prob", 1.0, "a number in"),
    ("sampling.crop_scale", (0.5, 1.5), r"\(low, high\)"),
    ("objective.area_weight", "x", "a finite number"),
    ("schedule.stages.1.filter", "class_embedding", "one of"),  # a research freeze mode, gone
    ("schedule.stages.0.removed_peak_weight", -1.0, "a number in"),
    ("schedule.stages.0.resolution", 0.0, "a number in"),
    ("schedule.stages.0.share", 0.5, "shares that add up to 1"),
    ("schedule.stages.2.share", 0.5, "no stage '2'"),
    ("schedule.stages.0.cells", 3, "unknown setting 'cells'"),
    ("model.bogus", 1, "unknown setting 'bogus'"),
    ("bogus", 1, "unknown setting 'bogus'"),
    ("name", "other", "not a setting"),
])
def test_bad_values_name_the_dotted_setting(path, value, expected):
    with pytest.raises(ValueError, match=rf"^{path.replace('.', '[.]')}: .*{expected}"):
        get_recipe("small").replace(**{path: value})


def test_a_group_dict_names_each_setting_too():
    with pytest.raises(ValueError, match=r"^schedule\.batch_size: expected an int >= 1"):
        get_recipe("small").replace(schedule={"batch_size": -2})
    with pytest.raises(ValueError, match=r"^schedule\.stages: expected at least one mask stage"):
        get_recipe("small").replace(schedule={"stages": [{"kind": "embedding", "share": 1.0}]})


def test_recipes_and_their_groups_are_frozen():
    recipe = get_recipe("small")
    for target, name in ((recipe, "name"), (recipe.schedule, "batch_size"), (recipe.model, "encoder"),
                         (recipe.schedule.stages[0], "share"), (recipe.objective, "area_weight")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(target, name, getattr(target, name))
    assert isinstance(recipe.schedule.stages, tuple)  # a list would be changeable in place


def test_the_named_recipes_say_what_the_docs_say():
    timm_recipe, cifar, small, paper = (get_recipe(n) for n in ("timm", "cifar", "small", "paper"))
    assert timm_recipe.model.encoder == "classifier" and timm_recipe.model.class_embedding == "classifier_head"
    assert all(isinstance(s, MaskStage) and s.filter == "fixed" for s in timm_recipe.schedule.stages)
    assert [s.resolution for s in timm_recipe.schedule.stages] == [0.5, 1.0]
    assert timm_recipe.sampling.class_source == "prediction"
    assert isinstance(cifar.schedule.stages[0], EmbeddingStage) and cifar.schedule.stages[1].filter == "fixed"
    assert small.model.gate_encoder and small.schedule.stages[1].filter == "presence_only"
    assert small.schedule.stages[0].removed_peak_weight == 1.0
    assert paper.model.encoder == "resnet50" and paper.objective == SaliencyObjective.paper()
    assert torch.tensor([s.share for s in cifar.schedule.stages]).sum().item() == pytest.approx(1.0)
