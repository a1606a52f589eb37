"""Push this project's published explainers (every ``blackbox_saliency/weights/explainer-*`` folder) to the Hub.

    HF_TOKEN=... python hub/push.py --owner blackbox-saliency [--private] [--dry-run]

Each folder is loaded first (safetensors, strict, config checked), so a broken folder is never
published; its model card is regenerated with the repo id in the usage example.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from blackbox_saliency import Explainer
from blackbox_saliency.pretrained import WEIGHTS_FOLDER as HUB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owner", default="blackbox-saliency", help="Hub user or organisation")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None, help="default: HF_TOKEN or the logged-in token")
    parser.add_argument("--dry-run", action="store_true", help="load and check every folder, push nothing")
    args = parser.parse_args()
    folders = sorted(p for p in HUB.glob("explainer-*") if p.is_dir())
    if not folders:
        raise SystemExit(f"no explainer-* folders in {HUB}")
    for folder in folders:
        explainer = Explainer.from_pretrained(folder)
        repo_id = f"{args.owner}/{folder.name}"
        if args.dry_run:
            print(f"{folder.name}: ok ({explainer.num_classes} classes), would push to {repo_id}")
            continue
        print(f"{folder.name} -> {explainer.push_to_hub(repo_id, private=args.private or None, token=args.token)}")


if __name__ == "__main__":
    main()
