"""Train an explainer for your own classifier: the paper's CIFAR-10 variant.

    python examples/fit_custom_classifier.py --cifar-pack ../shared/data/cifar10-jpeg.tar.gz

1. trains a small CNN on CIFAR-10 (stands in for *your* classifier; any nn.Module mapping
   (N, 3, H, W) to logits works),
2. trains an explainer for it with ``fit_explainer(..., encoder="small")`` (random-init encoder
   of 3 blocks of 5 convs, as in the paper's section 5.2),
3. saves it and writes a picture of masks for a few test images.

Defaults run in a few minutes on a laptop CPU with a subset of the data and few epochs. The
explainer is trained with a recipe of ``hub/train_cifar10.py`` (``RECIPE`` below; why, in
``docs/objective.md``): with ``fit_explainer``'s plain defaults of before 2026-12-06 the masks
collapsed to nothing on CIFAR-10. The class embedding gets 3 epochs of its own before the masks' 2
(``--embedding-epochs``): a class it does not recognise gets an empty mask. The script ends by
printing the mean mask on test images for the true class and for an absent one: check both
before trusting an explainer. With the defaults (2026-12-02, 2 CPU threads, 3.5 min in all) the
classifier reached 51.8% and the masks averaged 0.123 for the true class and 0.028 for an
absent one (one run; the run before 2026-12-01's eleventh session, with the embedding stage a
quarter of 2 epochs and an unseeded classifier, three changes at once: 0.099 and 0.061). The API at work, not a good explainer,
which needs a good classifier and longer training. The shipped one, ``load_classifier("cifar10")`` with its explainer,
is made by ``hub/train_cifar10.py``. On a GPU use ``--train-images 50000
--classifier-epochs 30 --epochs 20``.
"""

import argparse
import tarfile
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Subset
from torchvision import datasets, transforms

from blackbox_saliency import explain, fit_explainer
from blackbox_saliency.visualize import denormalize, saliency_panel

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
# hub/train_cifar10.py's variant fixed-stage-preserve1: the embedding stage's classes fixed
# before the masks train, preserve term as strong as destroy, a 16 x 16 mask for 32 px images.
# The shipped explainer also gives half the samples a wrong class (fake_label_prob=0.5); with
# this script's weak classifier that emptied every mask (0.006 true, 0.004 absent), so not here.
# No removed-peak loss (fit_explainer's default for encoder="small" since 2026-12-06), as measured.
RECIPE = dict(objective={"preserve_weight": 1.0}, freeze_embedding=True, mask_reduction=2, removed_peak_weight=0.0)


def small_cnn() -> nn.Module:
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def train_classifier(model: nn.Module, data, epochs: int, device: str) -> nn.Module:
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.to(device).train()
    for epoch in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"classifier epoch {epoch + 1}: loss {loss.item():.3f}")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar-pack", type=Path, default=Path("../shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/cifar10"))
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--classifier-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="explainer epochs of the mask stage (the paper: 20)")
    parser.add_argument("--embedding-epochs", type=int, default=3,
                        help="epochs of the class embedding's stage before the masks (cheap; a class it does not "
                             "recognise gets an empty mask)")
    parser.add_argument("--out", type=Path, default=Path("explainer-cifar10"))
    args = parser.parse_args()
    if args.embedding_epochs < 0:
        parser.error(f"--embedding-epochs: must be 0 or more, got {args.embedding_epochs}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)  # the classifier's init and shuffling

    if not (args.cache / "cifar10").exists():
        args.cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.cifar_pack) as tar:
            tar.extractall(args.cache)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train = datasets.ImageFolder(str(args.cache / "cifar10" / "train"), transform=tf)
    test = datasets.ImageFolder(str(args.cache / "cifar10" / "test"), transform=tf)
    subset = Subset(train, torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.train_images].tolist())

    classifier = train_classifier(small_cnn(), subset, args.classifier_epochs, device)
    with torch.no_grad():
        # a random 1000: the test folder is sorted by class, so its first 1000 are all airplanes
        picks = torch.randperm(len(test), generator=torch.Generator().manual_seed(1))[:1000].tolist()
        x, y = zip(*(test[i] for i in picks))
        accuracy = (classifier(torch.stack(x).to(device)).argmax(1).cpu() == torch.tensor(y)).float().mean()
    print(f"classifier accuracy on 1000 random test images: {accuracy:.2%}")

    batch_size = 64
    explainer = fit_explainer(classifier, subset, encoder="small", epochs=args.embedding_epochs + args.epochs,
                              embedding_steps=args.embedding_epochs * (len(subset) // batch_size), batch_size=batch_size,
                              checkpoint_dir=args.out / "checkpoints", classifier_info={"name": "small_cnn-cifar10",
                              "mean": list(MEAN), "std": list(STD), "class_names": train.classes}, **RECIPE)
    explainer.save_pretrained(args.out)
    print(f"saved explainer to {args.out}")

    # class-selective or not: the mask for the true class against the mask for another class
    images = torch.stack([x[i] for i in range(500)]).to(device)
    labels = torch.tensor(y[:500])
    absent = (labels + torch.randint(1, 10, labels.shape, generator=torch.Generator().manual_seed(2))) % 10
    true_area = explain(classifier, images, labels, explainer=explainer).mean().item()
    absent_area = explain(classifier, images, absent, explainer=explainer).mean().item()
    print(f"mean mask on 500 test images: true class {true_area:.3f}, absent class {absent_area:.3f}")

    images = torch.stack([test[i][0] for i in range(0, 8000, 1000)])
    labels = torch.tensor([test[i][1] for i in range(0, 8000, 1000)])
    masks = explain(classifier, images.to(device), labels, explainer=explainer).cpu()
    for i, (image, mask) in enumerate(zip(images, masks)):
        upscale = lambda t: nn.functional.interpolate(t[None], scale_factor=4, mode="nearest")[0]  # noqa: E731
        saliency_panel(upscale(denormalize(image, MEAN, STD)), upscale(mask), train.classes[labels[i]]).save(args.out / f"test{i}.png")
    print(f"wrote {len(images)} pictures to {args.out}")


if __name__ == "__main__":
    main()
