"""Save, load, push and pull explainers, hermetically: the Hub download is exercised through
the Hub's own cache layout in offline mode, the upload against a stub that records files."""

import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

import blackbox_saliency.api as api
import blackbox_saliency.hub as hub
from blackbox_saliency import Explainer, explain
from blackbox_saliency.hub import WEIGHTS_FOLDER

from conftest import SMALL, tiny_cnn


@pytest.fixture
def explainer():
    torch.manual_seed(0)
    return Explainer(num_classes=4, **SMALL, classifier_info={"name": "tiny_cnn", "input_size": [3, 32, 32]}).eval()


def test_round_trip_gives_identical_masks(explainer, tmp_path):
    explainer.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = Explainer.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(explainer(x, [1, 2]), loaded(x, [1, 2]))
    assert loaded.config == explainer.config and loaded.config.to_dict() == explainer.config.to_dict()
    assert loaded._hub_mixin_config is loaded.config  # the mixin's config is the ExplainerConfig, not a copy
    assert isinstance(loaded, huggingface_hub.PyTorchModelHubMixin) and not loaded.training


def test_model_card_says_what_it_explains(explainer, tmp_path):
    explainer.config.evaluation = "| metric | value |\n| --- | --- |\n| error | 0.1 |"
    explainer.save_pretrained(tmp_path, repo_id="someone/explainer-tiny")
    card = huggingface_hub.ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "blackbox-saliency" and "saliency" in card.data.tags
    assert "pytorch_model_hub_mixin" in card.data.tags  # the mixin's card data, not a hand-made copy
    assert card.data.license == "mit" and card.data.pipeline_tag == "image-segmentation"
    for text in ("`tiny_cnn`", "nothing else", 'from_pretrained("someone/explainer-tiny")', "| error | 0.1 |", "Dabkowski",
                 hub.PAPER_URL):
        assert text in card.text
    assert str(explainer.generate_model_card(repo_id="someone/explainer-tiny")) == str(card)


def test_model_card_tabulates_an_evaluation_and_links_the_code(explainer, tmp_path, monkeypatch):
    explainer.config.evaluation = {"data": "held-out planted images",
                                   "results": [{"size": 32, "localisation_error": 0.12345}, {"size": 64}]}
    monkeypatch.setattr(explainer._hub_mixin_info, "repo_url", "https://example.org/blackbox-saliency")
    explainer.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "Data: held-out planted images" in text and "| size | localisation_error |" in text
    assert "| 32 | 0.123 |" in text and "| 64 |  |" in text
    assert "- code: https://example.org/blackbox-saliency" in text
    assert 'from_pretrained("path/to/this/folder")' in text  # no repo id given


def _put_in_hub_cache(folder, cache, repo_id, commit="0123456789abcdef0123456789abcdef01234567"):
    """The Hub's cache layout: models--owner--name/{refs/main, snapshots/<commit>/files}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())


def test_load_by_repo_id_from_the_hub_cache_offline(explainer, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    explainer.save_pretrained(tmp_path / "saved")
    _put_in_hub_cache(tmp_path / "saved", tmp_path / "cache", "someone/explainer-tiny")
    loaded = Explainer.from_pretrained("someone/explainer-tiny", cache_dir=tmp_path / "cache")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x, 3), explainer(x, 3))
    with pytest.raises(FileNotFoundError, match="name_or_folder: could not get Hub repo 'someone/absent'"):
        Explainer.from_pretrained("someone/absent", cache_dir=tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # local_files_only: the cache only
    loaded = Explainer.from_pretrained("someone/explainer-tiny", cache_dir=tmp_path / "cache", local_files_only=True)
    assert torch.equal(loaded(x, 3), explainer(x, 3))
    with pytest.raises(FileNotFoundError, match="could not get Hub repo 'someone/absent'"):
        Explainer.from_pretrained("someone/absent", cache_dir=tmp_path / "cache", local_files_only=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # dots are common in Hub repo names
    _put_in_hub_cache(tmp_path / "saved", tmp_path / "cache", "someone/explainer.v2")
    assert torch.equal(Explainer.from_pretrained("someone/explainer.v2", cache_dir=tmp_path / "cache")(x, 3), explainer(x, 3))


class RecordingApi:
    """Stands in for ``HfApi`` in the mixin's ``push_to_hub``: records what would be uploaded."""

    calls: dict = {}

    def __init__(self, token=None):
        RecordingApi.calls = {"token": token}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        self.calls["create"] = (repo_id, private, exist_ok)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, commit_message, revision=None, **kwargs):
        self.calls.update(repo=repo_id, message=commit_message, revision=revision,
                          files=sorted(p.name for p in Path(folder_path).iterdir()),
                          card=(Path(folder_path) / "README.md").read_text(),
                          config=json.loads((Path(folder_path) / "config.json").read_text()))
        return f"https://huggingface.co/{repo_id}/commit/abc"


def test_push_to_hub_uploads_weights_config_and_card(explainer, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", RecordingApi)  # the mixin's push_to_hub uploads
    url = explainer.push_to_hub("someone/explainer-tiny", private=True, token="secret", branch="v1")
    calls = RecordingApi.calls
    assert url.endswith("/commit/abc")
    assert calls["create"] == ("someone/explainer-tiny", True, True) and calls["token"] == "secret"
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert calls["revision"] == "v1" and calls["message"] == "Upload blackbox-saliency explainer"
    assert 'from_pretrained("someone/explainer-tiny")' in calls["card"]
    assert calls["config"] == explainer.config.to_dict()
    for bad in ("no-owner", "a/b/c", "bad name/x"):
        with pytest.raises(ValueError, match="repo_id"):
            explainer.push_to_hub(bad)
    RecordingApi.calls = {}
    assert explainer.save_pretrained(tmp_path, repo_id="someone/saved", push_to_hub=True).endswith("/commit/abc")
    assert RecordingApi.calls["repo"] == "someone/saved" and 'from_pretrained("someone/saved")' in RecordingApi.calls["card"]


def _mutate_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"num_classes": 5}, ValueError, "do not match its config"),
        ({"encoder": "no_such_net"}, ValueError, "unknown encoder architecture"),
        ({"num_classes": "4"}, ValueError, "num_classes must be int"),
        ({"freeze_encoder": 1}, ValueError, "freeze_encoder must be bool"),
        ({"encoder_kwargs": {"checkpoint_path": "/tmp/x.pth"}}, ValueError, "not allowed"),
        ({"objective": {"lambda9": 1}}, ValueError, "unknown setting"),
        ({"format": "other"}, ValueError, "not a blackbox-saliency explainer"),
        ({"version": 99}, ValueError, "unsupported version"),
        ({"in_chans": 1}, ValueError, "does not have in_chans=1"),
        ({"surprise": 1}, ValueError, "unknown key"),
        ({"classifier": {"input_size": [3, 32]}}, ValueError, "input_size must be"),
        ({"classifier": {"mean": {"r": 0.5}}}, ValueError, "mean must be"),
        ({"classifier": {"name": "x", "source": "y"}}, ValueError, "unknown key"),
        ({"classifier": [3, 32, 32]}, ValueError, "classifier: must be an object"),
        ({"training": "yesterday"}, ValueError, "training must be an object"),
        ({"presence_reference": "-2"}, ValueError, "presence_reference must be"),
        ({"presence_reference": float("nan")}, ValueError, "presence_reference must be a finite number"),
        ({"presence_std_threshold": "2"}, ValueError, "presence_std_threshold must be"),
        ({"presence_std_threshold": float("inf")}, ValueError, "presence_std_threshold must be a finite number"),
        ({"presence_std_threshold": 2.0, "presence_reference": 0.0}, ValueError, "cannot both be set"),
    ],
)
def test_bad_configs_are_refused_before_building(explainer, tmp_path, change, error, match):
    explainer.save_pretrained(tmp_path)
    _mutate_config(tmp_path, **change)
    with pytest.raises(error, match=match):
        Explainer.from_pretrained(tmp_path)


def test_weights_are_loaded_strictly(explainer, tmp_path):
    """The mixin loads non-strictly by default; an explainer's weights must fit exactly."""
    from safetensors.torch import load_file, save_file

    explainer.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({**state, "surplus.weight": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="(?s)do not match its config.*surplus.weight"):
        Explainer.from_pretrained(tmp_path)
    missing = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != missing}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"(?s)do not match its config.*{missing}"):
        Explainer.from_pretrained(tmp_path)


def test_config_json_that_is_not_an_object_is_refused(explainer, tmp_path):
    explainer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a blackbox-saliency explainer"):
        Explainer.from_pretrained(tmp_path)


def test_pickles_are_never_loaded_not_even_from_the_hub(explainer, tmp_path, monkeypatch):
    """The mixin falls back to pytorch_model.bin when a repo has no safetensors; not here."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    explainer.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "model.safetensors").unlink()
    (tmp_path / "saved" / "pytorch_model.bin").write_bytes(b"not even a real pickle")
    with pytest.raises(ValueError, match="only pickle checkpoint"):
        Explainer.from_pretrained(tmp_path / "saved")
    _put_in_hub_cache(tmp_path / "saved", tmp_path / "cache", "someone/pickled")
    with pytest.raises(ValueError, match="only pickle checkpoint"):
        Explainer.from_pretrained("someone/pickled", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="pickle"):
        Explainer._load_as_pickle(explainer, str(tmp_path / "saved" / "pytorch_model.bin"), "cpu", False)


def test_arguments_config_json_cannot_hold_are_refused_by_name(explainer, tmp_path):
    """The mixin leaves non-JSON constructor arguments out of the config without a word."""
    with pytest.raises(ValueError, match="classifier_info: mean"):
        Explainer(4, **SMALL, classifier_info={"mean": torch.tensor([0.5, 0.5, 0.5])})
    with pytest.raises(TypeError, match="objective: must be plain JSON"):
        Explainer(4, **SMALL, objective={"tv_weight": torch.tensor(1.0)})
    with pytest.raises(TypeError, match="encoder_kwargs: must be plain JSON"):
        Explainer(4, encoder="small", encoder_kwargs={"widths": [8, 16, 32], "layers_per_block": object()})
    explainer.config.evaluation = {"error": torch.tensor(0.1)}
    with pytest.raises(TypeError, match="config: evaluation: must be plain JSON"):
        explainer.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written
    with pytest.raises(ValueError, match="config: an explainer saves its own config"):
        explainer.save_pretrained(tmp_path / "out", config={"num_classes": 4})
    with pytest.raises(TypeError, match="config: expected an ExplainerConfig"):
        explainer.config = {"num_classes": 4}


def test_a_failed_save_leaves_the_folder_as_it_was(explainer, tmp_path, monkeypatch):
    """The mixin's save_pretrained deletes config.json before writing the weights; here every
    file is replaced atomically, so a crash leaves the previous save whole."""
    import safetensors.torch

    explainer.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    explainer.config.training_data = "something new"
    with pytest.raises(OSError, match="disk full"):
        explainer.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    explainer.save_pretrained(tmp_path)  # saving again over a folder replaces the card too
    assert "something new" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("name", ["explainer-planted-demo", "explainer-efficientnet_lite0"])
def test_shipped_configs_load_and_save_unchanged(name, tmp_path):
    from safetensors.torch import load_file

    folder = WEIGHTS_FOLDER / name
    original = json.loads((folder / "config.json").read_text())
    explainer = Explainer.from_pretrained(folder)
    # written before class_filter existed, the demo means the paper's filter; written before
    # class_embedding existed, both learn one embedding per class; before gate_encoder, one encoder
    added = {"class_filter": "bottleneck", "class_embedding": "learned", "class_embedding_features": None,
             "presence_reference": None, "presence_std_threshold": None, "gate_encoder": False}
    assert explainer.config.to_dict() == {**added, **original}
    assert explainer.masking_model.class_filter == original.get("class_filter", "bottleneck")
    assert explainer.config.classifier.input_size == original["classifier"]["input_size"]
    state = load_file(folder / "model.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in explainer.state_dict().items()) and len(state) == len(explainer.state_dict())
    explainer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "config.json").read_text()) == {**added, **original}


def test_explainer_config_is_one_plain_object(explainer):
    from blackbox_saliency.explainer import ClassifierInfo, ExplainerConfig

    config = explainer.config
    assert isinstance(config, ExplainerConfig) and isinstance(config.classifier, ClassifierInfo)
    assert (config.num_classes, config.in_chans, config.classifier.name, config.classifier.input_size) == (
        4, 3, "tiny_cnn", [3, 32, 32])
    assert config.classifier.mean is None and "mean" not in config.to_dict()["classifier"]
    assert config.training is None and "training" not in config.to_dict()  # not recorded: left out
    assert ExplainerConfig.from_dict(config.to_dict()) == config
    rebuilt = Explainer.from_config(config)
    assert rebuilt.config == config and rebuilt.config is not config
    info = ClassifierInfo(name="cnn", input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.25] * 3, class_names=list("abcd"))
    assert Explainer(4, **SMALL, classifier_info=info).config.classifier == info


def test_bad_folders(explainer, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hub repo id"):
        Explainer.from_pretrained(tmp_path / "nothing" / "here")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Explainer.from_pretrained(tmp_path)
    explainer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Explainer.from_pretrained(tmp_path)
    explainer.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        Explainer.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Explainer.from_pretrained(tmp_path)
    torch.save(explainer.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickle checkpoint"):
        Explainer.from_pretrained(tmp_path)


def test_explain_takes_a_folder_name(explainer, tmp_path):
    explainer.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(explain(tiny_cnn(4), x, [0, 1], explainer=str(tmp_path)), explainer(x, [0, 1]).detach())


def test_explainer_must_match_the_classifier(explainer):
    with pytest.raises(ValueError, match="explains a classifier of 4 classes, this one returns 7"):
        explain(tiny_cnn(7), torch.randn(1, 3, 32, 32), 0, explainer=explainer)
    with pytest.raises(ValueError, match=r"trained on inputs of shape \(3, 32, 32\)"):
        explain(tiny_cnn(4), torch.randn(1, 3, 64, 64), 0, explainer=explainer)


def test_known_timm_classifier_gets_its_explainer(explainer, tmp_path, monkeypatch):
    import timm

    classifier = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    explainer.save_pretrained(tmp_path / "explainer-resnet18")
    monkeypatch.setattr(hub, "WEIGHTS_FOLDER", tmp_path)
    monkeypatch.setitem(hub.KNOWN_EXPLAINERS, "resnet18", {"repo_id": "x/y", "folder": "explainer-resnet18"})
    hub.clear_cache()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(explain(classifier, x, [1, 2], method="explainer"), explainer(x, [1, 2]).detach())


def test_unknown_classifier_falls_back_to_optimisation(monkeypatch):
    monkeypatch.setattr(api, "_warned_fallback", True)
    with pytest.raises(ValueError, match="needs a trained explainer"):
        explain(tiny_cnn(4), torch.randn(1, 3, 32, 32), 0, method="explainer")


def test_cli_push_and_pull(explainer, tmp_path, monkeypatch, capsys):
    from blackbox_saliency.cli import main

    explainer.save_pretrained(tmp_path / "saved")
    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", RecordingApi)
    assert main(["push", str(tmp_path / "saved"), "someone/tiny"]) == 0
    assert RecordingApi.calls["repo"] == "someone/tiny"
    assert RecordingApi.calls["files"] == ["README.md", "config.json", "model.safetensors"]

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _put_in_hub_cache(tmp_path / "saved", tmp_path / "cache", "someone/tiny")
    assert main(["pull", "someone/tiny", "--out", str(tmp_path / "copy")]) == 0
    assert "explains tiny_cnn (4 classes)" in capsys.readouterr().out
    assert (tmp_path / "copy" / "model.safetensors").exists()
    assert main(["pull", "someone/not-there"]) == 2
    assert "could not get Hub repo" in capsys.readouterr().err


def test_the_published_demo_explainer_works():
    from pathlib import Path

    from blackbox_saliency.metrics import localisation_error
    from blackbox_saliency.testing import PatternClassifier, PlantedPatterns

    folder = WEIGHTS_FOLDER / "explainer-planted-demo"
    explainer = Explainer.from_pretrained(folder)
    data = PlantedPatterns(64, patch=12, seed=321)
    masks = explain(PatternClassifier(patch=12), data.images, data.labels, explainer=explainer)
    assert localisation_error(masks, [b[None] for b in data.boxes]) <= 0.2
    assert explain(PatternClassifier(patch=12), data.images, (data.labels + 2) % 4, explainer=explainer).mean() < 0.05


def test_an_explainer_on_a_handed_in_timm_encoder_saves_and_reloads(tmp_path):
    import timm

    encoder = timm.create_model("resnet18", features_only=True, pretrained=False)
    with torch.no_grad():
        encoder.conv1.weight.mul_(1.5)  # "loaded" weights that a rebuilt encoder would not have
    explainer = Explainer(num_classes=4, encoder=encoder, num_bottlenecks=1).eval()
    assert explainer.config.encoder == "resnet18" and explainer.config.freeze_encoder
    explainer.save_pretrained(tmp_path)
    loaded = Explainer.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(explainer(x, [0, 1]), loaded(x, [0, 1]))


def test_known_explainer_is_skipped_when_it_does_not_fit(explainer, tmp_path, monkeypatch):
    import timm

    explainer.save_pretrained(tmp_path / "explainer-resnet18")
    monkeypatch.setattr(hub, "WEIGHTS_FOLDER", tmp_path)
    monkeypatch.setitem(hub.KNOWN_EXPLAINERS, "resnet18", {"repo_id": "x/y", "folder": "explainer-resnet18"})
    hub.clear_cache()
    fine_tuned = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()  # 7 classes, not 4
    with pytest.raises(ValueError, match="needs a trained explainer"):
        explain(fine_tuned, torch.randn(1, 3, 32, 32), 0, method="explainer")
    same = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    with pytest.raises(ValueError, match="needs a trained explainer"):  # 64 px, not its 32 px
        explain(same, torch.randn(1, 3, 64, 64), 0, method="explainer")


def test_model_card_states_the_masks_resolution():
    from conftest import SMALL

    for reduction in (2, 4):
        card = str(Explainer(num_classes=3, mask_reduction=reduction, **SMALL).generate_model_card())
        assert f"The mask has 1/{reduction} of the input resolution" in card


def test_a_fitted_explainer_records_its_recipe_in_the_config_and_the_card(tmp_path):
    from blackbox_saliency import Recipe, fit_explainer, get_recipe
    from blackbox_saliency.testing import PatternClassifier, PlantedPatterns

    changes = {"model.encoder_kwargs": SMALL["encoder_kwargs"], "objective.area_weight": 6.0, "schedule.batch_size": 8,
               "runtime.precision": "fp32"}
    recipe = get_recipe("small").replace(**changes)
    explainer = fit_explainer(PatternClassifier(patch=12), PlantedPatterns(16, patch=12), recipe, steps=1, seed=3,
                              progress=False)
    explainer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    training = config["training"]
    assert training["recipe"] == "small" and training["seed"] == 3 and training["steps"] == 1
    assert training["overrides"] == changes  # the run's length is not a change of the recipe
    assert config["objective"]["area_weight"] == 6.0
    # the settings rebuild the recipe the run trained with
    rebuilt = Recipe.from_dict(training["settings"])
    assert (rebuilt.model, rebuilt.objective, rebuilt.sampling, rebuilt.runtime) == (
        recipe.model, recipe.objective, recipe.sampling, recipe.runtime)
    assert rebuilt.schedule.stages == recipe.schedule.stages and (rebuilt.schedule.steps, rebuilt.schedule.epochs) == (1, None)
    card = (tmp_path / "README.md").read_text()
    assert '"recipe": "small"' in card and '"objective.area_weight": 6.0' in card
