"""Train the demo explainer ``blackbox_saliency/weights/explainer-planted-demo`` on the CPU (about a minute).

    python hub/train_planted_demo.py

It explains ``blackbox_saliency.testing.PatternClassifier(patch=12)``, the hand-built
classifier of the planted-pattern task: a small, honest explainer that exercises saving,
pushing and pulling without pretending to explain a real classifier.
"""

from datetime import date
from pathlib import Path

import torch

from blackbox_saliency import fit_explainer, get_recipe
from blackbox_saliency.metrics import localisation_error
from blackbox_saliency.hub import WEIGHTS_FOLDER
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns

OUT = WEIGHTS_FOLDER / "explainer-planted-demo"


def main() -> None:
    torch.set_num_threads(2)
    train, test = PlantedPatterns(4000, patch=12, seed=0), PlantedPatterns(300, patch=12, seed=1)
    recipe = get_recipe("small").replace(**{"model.encoder_kwargs": {"widths": [16, 32, 64]}, "runtime.precision": "fp32"})
    explainer = fit_explainer(PatternClassifier(patch=12), train, recipe, steps=1000, seed=0, device="cpu", progress=False)
    explainer.config.classifier.name = "blackbox_saliency.testing.PatternClassifier(patch=12)"
    explainer.config.classifier.mean = explainer.config.classifier.std = "none (images as PlantedPatterns makes them)"
    with torch.no_grad():
        masks = explainer(test.images, test.labels)
        absent = explainer(test.images, (test.labels + 1) % 4)
    error = localisation_error(masks, [b[None] for b in test.boxes])
    explainer.config.training_data = "blackbox_saliency.testing.PlantedPatterns(4000, patch=12, seed=0)"
    explainer.config.evaluation = (
        "On `PlantedPatterns(300, patch=12, seed=1)` (images it never saw), measured by "
        f"`python hub/train_planted_demo.py` on a 2-core x86-64 CPU, {date.today()}:\n\n"
        "| localisation error (IoU > 0.5) | mean mask, true class | mean mask, absent class |\n| --- | --- | --- |\n"
        f"| {error:.3f} | {masks.mean():.3f} | {absent.mean():.3f} |"
    )
    explainer.save_pretrained(OUT, repo_id="blackbox-saliency/explainer-planted-demo")
    print(explainer.config.evaluation)


if __name__ == "__main__":
    main()
