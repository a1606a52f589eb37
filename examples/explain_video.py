"""Explain every frame of a video (an image sequence) and write the overlay as an animated GIF.

    python examples/explain_video.py                        # a synthetic clip, offline, seconds
    python examples/explain_video.py --frames DIR --classifier efficientnet_lite0 --explainer FOLDER

The paper's suggested application: one forward pass per frame is fast enough for video. With
no ``--frames``, the clip is a planted pattern moving across a smooth background, explained by
the demo explainer shipped in ``blackbox_saliency/weights/explainer-planted-demo`` (it explains the hand-built classifier of
``blackbox_saliency.testing``). With ``--frames``, every image in DIR (sorted by name) is one
frame; the class explained is the classifier's top prediction on each frame. Frames per second
are printed (explainer time only, after a warm-up frame).
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from blackbox_saliency import Explainer, load_classifier
from blackbox_saliency.hub import WEIGHTS_FOLDER
from blackbox_saliency.testing import PatternClassifier, planted_patterns
from blackbox_saliency.visualize import denormalize, overlay, to_pil

DEMO = WEIGHTS_FOLDER / "explainer-planted-demo"


def synthetic_clip(frames: int = 48, size: int = 32, patch: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """A pattern (class 2) gliding along a diagonal over a slowly changing smooth background."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 4, generator=g) * 0.5
    clip = []
    for t in range(frames):
        w = t / (frames - 1)
        background = F.interpolate(((1 - w) * a + w * b)[None], size=(size, size), mode="bicubic")[0]
        offset = round(w * (size - patch))
        x = background.clone()
        region = x[:, offset : offset + patch, offset : offset + patch]
        x[:, offset : offset + patch, offset : offset + patch] = region.mean() + 0.8 * planted_patterns(patch)[2]
        clip.append(x)
    return torch.stack(clip), torch.full((frames,), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=Path, default=None, help="folder of frames (default: a synthetic clip)")
    parser.add_argument("--classifier", default="efficientnet_lite0")
    parser.add_argument("--explainer", default=None, help="folder or Hub repo id of an explainer for the classifier")
    parser.add_argument("--out", type=Path, default=Path("saliency-out/video.gif"))
    parser.add_argument("--fps", type=float, default=12.0, help="frame rate of the GIF")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.frames is None:
        explainer = Explainer.from_pretrained(DEMO).to(device)
        frames, classes = synthetic_clip()
        pixels = (frames * 0.5 + 0.5).clamp(0, 1)
        scale = 8  # 32 px frames are tiny on screen
    else:
        if not args.explainer:
            parser.error("--explainer: a trained explainer for the classifier is needed for video")
        model, preprocess = load_classifier(args.classifier)
        explainer = Explainer.from_pretrained(args.explainer).to(device)
        files = sorted(p for p in args.frames.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if not files:
            parser.error(f"--frames: no .jpg or .png images in {args.frames}")
        frames = torch.stack([preprocess(Image.open(p)) for p in files])
        with torch.no_grad():
            classes = model.to(device)(frames.to(device)).argmax(1).cpu()
        pixels = denormalize(frames, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
        scale = 1

    with torch.no_grad():
        explainer(frames[:1].to(device), classes[:1].to(device))  # warm-up
        masks, start = [], time.perf_counter()
        for frame, cls in zip(frames, classes):  # one frame at a time, as a live stream would come
            masks.append(explainer(frame[None].to(device), cls[None].to(device)).cpu())
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    print(f"{len(frames)} frames explained in {seconds:.2f}s: {len(frames) / seconds:.0f} frames per second on {device}")

    images = []
    for image, mask in zip(pixels, torch.cat(masks)):
        picture = to_pil(overlay(image, mask))
        images.append(picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(args.out, save_all=True, append_images=images[1:], duration=int(1000 / args.fps), loop=0)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
