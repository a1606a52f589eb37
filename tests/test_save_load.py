import json

import pytest
import torch

from blackbox_saliency import Explainer

from conftest import SMALL


def test_round_trip_gives_identical_masks(tmp_path):
    explainer = Explainer(num_classes=4, **SMALL, classifier_info={"name": "tiny"}).eval()
    explainer.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = Explainer.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(explainer(x, [1, 2]), loaded(x, [1, 2]))
    assert loaded.config == json.loads(json.dumps(explainer.config))


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Explainer.from_pretrained(tmp_path)
    Explainer(num_classes=4, **SMALL).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_classes": 5}))
    with pytest.raises(ValueError, match="do not match its config"):
        Explainer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Explainer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a blackbox-saliency explainer"):
        Explainer.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Explainer.from_pretrained(tmp_path)
