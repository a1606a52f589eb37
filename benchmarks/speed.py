"""Masks per second on one device, all methods on the same images: the explainer against its
classifier's own forward pass, gradient saliency, Grad-CAM and the iterative optimisation.

    python benchmarks/speed.py                     # the CPU here
    python benchmarks/speed.py --device cuda --bf16 --channels-last --compile --batch-size 256   # a GPU
    python benchmarks/speed.py --device cuda --bf16 --channels-last --compile reduce-overhead --batch-size 256

Two explainers at 224 px: one on a ResNet-50 encoder (the paper's size) and one on the
EfficientNet-Lite0 encoder; the classifier is EfficientNet-Lite0 (random weights when the
weights package is absent: speed does not depend on them). Throughput is measured on batches of
``--batch-size`` after warm-up; latency on single images. The iterative method is timed for
``--optimize-steps`` steps and reported per image for that many steps. On the CPU the process
first calls ``blackbox_saliency.allocator.keep_freed_memory()``, as the CLI does;
``BLACKBOX_SALIENCY_MALLOC=default`` in the environment times glibc's own behaviour (the header
says which).
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import timm
import torch

from blackbox_saliency import Explainer, explain
from blackbox_saliency.allocator import keep_freed_memory
from blackbox_saliency.baselines import grad_cam, gradient_saliency
from blackbox_saliency._precision import describe_cpu


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(fn, images, device, repeats, warmup: int = 1) -> float:
    for _ in range(warmup):  # compilation; CUDA graphs are recorded on the first calls
        fn(images)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(images)
    sync(device)
    return repeats * images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--optimize-steps", type=int, default=20)
    parser.add_argument("--bf16", action="store_true", help="explainers in bf16 (Explainer.for_inference)")
    parser.add_argument("--channels-last", action="store_true", help="explainers in channels-last layout")
    parser.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                        help="torch.compile the explainers, optionally in a mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--explainer", default=None,
                        help="also time a trained explainer (a folder or Hub repo id), e.g. blackbox_saliency/weights/explainer-efficientnet_lite0")
    args = parser.parse_args()
    device = args.device
    heap = keep_freed_memory() if device == "cpu" else None
    torch.manual_seed(0)
    classifier = timm.create_model("efficientnet_lite0", pretrained=False).eval().to(device)
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    ids = torch.randint(0, 1000, (args.batch_size,), device=device)
    rows = []

    with torch.no_grad():
        classifier_rate = rate(classifier, images, device, args.repeats)
    rows.append(("classifier forward (EfficientNet-Lite0)", classifier_rate, None))
    candidates = ["resnet50", "efficientnet_lite0"] + ([args.explainer] if args.explainer else [])
    for encoder in candidates:
        if encoder == args.explainer:
            explainer = Explainer.from_pretrained(encoder)
        else:
            explainer = Explainer(num_classes=1000, encoder=encoder, pretrained_encoder=False)
        explainer = explainer.to(device).for_inference(
            dtype=torch.bfloat16 if args.bf16 else None, channels_last=args.channels_last, compile=args.compile)

        def run(x, explainer=explainer):
            with torch.no_grad():
                return explainer(x, ids[: x.shape[0]])

        throughput = rate(run, images, device, args.repeats, warmup=3)
        latency = 1000 / rate(run, images[:1], device, max(20, args.repeats), warmup=3)
        compiled = "compiled" + (f" {args.compile}" if isinstance(args.compile, str) else "")
        options = [o for o, on in (("bf16", args.bf16), ("channels-last", args.channels_last), (compiled, args.compile)) if on]
        label = f"trained explainer {encoder}" if encoder == args.explainer else f"explainer, {encoder} encoder"
        rows.append((f"{label}{' (' + ', '.join(options) + ')' if options else ''}", throughput, latency))
    rows.append(("gradient saliency", rate(lambda x: gradient_saliency(classifier, x, ids[: x.shape[0]]), images, device, args.repeats), None))
    try:
        rows.append(("Grad-CAM (grad-cam)", rate(lambda x: grad_cam(classifier, x, ids[: x.shape[0]]), images, device, args.repeats), None))
    except ImportError:
        pass
    optimise = lambda x: explain(classifier, x, ids[: x.shape[0]], method="optimize", steps=args.optimize_steps)  # noqa: E731
    rows.append((f"iterative mask, {args.optimize_steps} steps", rate(optimise, images, device, 1), None))

    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{describe_cpu()} CPU, {torch.get_num_threads()} threads"
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items() if v not in (False, None)]
    print(f"Command: `python benchmarks/speed.py {' '.join(flags)}`  ")
    allocator = {True: "; freed memory kept in the heap (keep_freed_memory)",
                 False: "; glibc's own allocator behaviour", None: ""}[heap]
    print(f"Device: {name}; torch {torch.__version__}; batch {args.batch_size} at 224 px{allocator}; date: {date.today()}.\n")
    print("| method | masks/s | time per mask / classifier forward time | single-image latency (ms) |")
    print("| --- | --- | --- | --- |")
    for label, r, latency in rows:
        print(f"| {label} | {r:.1f} | {classifier_rate / r:.2f} | {'' if latency is None else f'{latency:.1f}'} |")
    print(f"\nAn iterative mask of 300 steps costs about {300 / args.optimize_steps:.0f} times the last row's time per image.")


if __name__ == "__main__":
    main()
