import os
import platform
import subprocess
import sys

import pytest
import torch

from blackbox_saliency import allocator, cli, fit_explainer, get_recipe
from blackbox_saliency.training import fit as fit_module

from conftest import SMALL
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns

linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                 reason="glibc's allocator only")

# Allocates, touches and frees a 64 MiB tensor (above glibc's largest dynamic mmap threshold,
# 32 MiB) eight times; prints whether the thresholds were raised and how many of the last six
# passes faulted in more than half a block's pages (the first two fault in either way).
_PROBE = """
import resource, sys, torch
from blackbox_saliency.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "apply" else False
faulted = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(16 * 2**20)
    del block
    faulted.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before > 64 * 2**20 // 4096 // 2)
print(applied, sum(faulted[2:]))
"""


def _probe(mode: str, **env: str) -> tuple[bool, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    environment.pop(allocator.OPT_OUT, None)
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env={**environment, **env}, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0] == "True", int(out[1])


@linux_glibc
def test_freed_blocks_stay_in_the_heap_instead_of_faulting_in_again():
    applied, faults = _probe("apply")
    default_applied, default_faults = _probe("default")
    assert applied and not default_applied
    assert default_faults == 6  # each block mapped anew, its pages faulted in every time
    assert faults <= 1          # the first blocks' memory reused (one stray pass tolerated)


@linux_glibc
def test_the_user_can_keep_glibcs_behaviour():
    assert _probe("apply", BLACKBOX_SALIENCY_MALLOC="default")[0] is False
    assert _probe("apply", MALLOC_MMAP_THRESHOLD_="262144")[0] is False  # their own setting wins


def test_fit_explainer_leaves_the_allocator_alone_unless_the_recipe_asks_and_the_command_line_applies_it(
        monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(fit_module, "keep_freed_memory", lambda: calls.append("fit"))
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("cli"))
    recipe = get_recipe("small").replace(**{"model.encoder_kwargs": SMALL["encoder_kwargs"], "schedule.batch_size": 8,
                                            "runtime.precision": "fp32"})
    data = PlantedPatterns(16, patch=12)
    fit_explainer(PatternClassifier(patch=12), data, recipe, steps=1, progress=False, device="cpu")
    assert calls == []  # it changes the whole process: a library does not, unasked
    asked = recipe.replace(**{"runtime.keep_freed_memory": True})
    fit_explainer(PatternClassifier(patch=12), data, asked, steps=1, progress=False, device="cpu")
    assert calls == ["fit"]
    cli.main(["explain", str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "out")])  # fails: no image
    assert calls == ["fit", "cli"]
