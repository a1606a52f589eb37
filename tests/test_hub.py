"""Save, load, push and pull explainers, hermetically: the Hub download is exercised through
the Hub's own cache layout in offline mode, the upload against a stub that records files."""

import json

import huggingface_hub
import pytest
import torch

import blackbox_saliency.api as api
import blackbox_saliency.hub as hub
import blackbox_saliency.pretrained as pretrained
from blackbox_saliency import Explainer, explain
from blackbox_saliency.pretrained import WEIGHTS_FOLDER

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
    assert loaded.config == json.loads(json.dumps(explainer.config))


def test_model_card_says_what_it_explains(explainer, tmp_path):
    explainer.config["evaluation"] = "| metric | value |\n| --- | --- |\n| error | 0.1 |"
    explainer.save_pretrained(tmp_path, repo_id="someone/explainer-tiny")
    card = huggingface_hub.ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "blackbox-saliency" and "saliency" in card.data.tags
    assert card.data.license and card.data.pipeline_tag
    for text in ("`tiny_cnn`", "nothing else", 'from_pretrained("someone/explainer-tiny")', "| error | 0.1 |", "Dabkowski"):
        assert text in card.text


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
    with pytest.raises(FileNotFoundError, match="could not get Hub repo 'someone/absent'"):
        Explainer.from_pretrained("someone/absent", cache_dir=tmp_path / "cache")
    # dots are common in Hub repo names
    _put_in_hub_cache(tmp_path / "saved", tmp_path / "cache", "someone/explainer.v2")
    assert torch.equal(Explainer.from_pretrained("someone/explainer.v2", cache_dir=tmp_path / "cache")(x, 3), explainer(x, 3))


def test_push_to_hub_uploads_weights_config_and_card(explainer, monkeypatch):
    calls = {}

    class RecordingApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message, repo_type=None):
            from pathlib import Path

            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["card"] = (Path(folder_path) / "README.md").read_text()
            return "https://huggingface.co/someone/explainer-tiny/commit/abc"

    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    url = explainer.push_to_hub("someone/explainer-tiny", private=True, token="secret")
    assert url.endswith("/commit/abc")
    assert calls["create"] == ("someone/explainer-tiny", True, True) and calls["token"] == "secret"
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert 'from_pretrained("someone/explainer-tiny")' in calls["card"]
    with pytest.raises(ValueError, match="repo_id"):
        explainer.push_to_hub("no-owner")


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
    ],
)
def test_bad_configs_are_refused_before_building(explainer, tmp_path, change, error, match):
    explainer.save_pretrained(tmp_path)
    _mutate_config(tmp_path, **change)
    with pytest.raises(error, match=match):
        Explainer.from_pretrained(tmp_path)


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
    monkeypatch.setattr(pretrained, "WEIGHTS_FOLDER", tmp_path)
    monkeypatch.setitem(pretrained.KNOWN_EXPLAINERS, "resnet18", {"repo_id": "x/y", "folder": "explainer-resnet18"})
    pretrained.clear_cache()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(explain(classifier, x, [1, 2], method="explainer"), explainer(x, [1, 2]).detach())


def test_unknown_classifier_falls_back_to_optimisation(monkeypatch):
    monkeypatch.setattr(api, "_warned_fallback", True)
    with pytest.raises(ValueError, match="needs a trained explainer"):
        explain(tiny_cnn(4), torch.randn(1, 3, 32, 32), 0, method="explainer")


def test_cli_push_and_pull(explainer, tmp_path, monkeypatch, capsys):
    from blackbox_saliency.cli import main

    explainer.save_pretrained(tmp_path / "saved")
    uploaded = {}

    class RecordingApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message, repo_type=None):
            from pathlib import Path

            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            return "url"

    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    assert main(["push", str(tmp_path / "saved"), "someone/tiny"]) == 0
    assert uploaded == {"repo": "someone/tiny", "files": ["README.md", "config.json", "model.safetensors"]}

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
    assert explainer.config["encoder"] == "resnet18" and explainer.config["freeze_encoder"]
    explainer.save_pretrained(tmp_path)
    loaded = Explainer.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(explainer(x, [0, 1]), loaded(x, [0, 1]))


def test_known_explainer_is_skipped_when_it_does_not_fit(explainer, tmp_path, monkeypatch):
    import timm

    explainer.save_pretrained(tmp_path / "explainer-resnet18")
    monkeypatch.setattr(pretrained, "WEIGHTS_FOLDER", tmp_path)
    monkeypatch.setitem(pretrained.KNOWN_EXPLAINERS, "resnet18", {"repo_id": "x/y", "folder": "explainer-resnet18"})
    pretrained.clear_cache()
    fine_tuned = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()  # 7 classes, not 4
    with pytest.raises(ValueError, match="needs a trained explainer"):
        explain(fine_tuned, torch.randn(1, 3, 32, 32), 0, method="explainer")
    same = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    with pytest.raises(ValueError, match="needs a trained explainer"):  # 64 px, not its 32 px
        explain(same, torch.randn(1, 3, 64, 64), 0, method="explainer")
