"""The real build path, once: the project's wheel and its pinned runtime dependencies.

Slow (about 35 s here with a warm cache: the wheelhouse is cached under $QKDN_IMAGE_CACHE,
default ~/.cache/qkdn-images; the first run downloads the pinned wheels once). The image
carries the node runtime only (the base install, no extra), and the flashed image boots
and passes the node's own self-test (``qkdn qrng selftest``) run from the slot's
application.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from images.boot import boot, commit, default_health
from images.build import BuildSpec, build, build_wheelhouse
from images.install import flash
from images.target import init_target
from tests.base_install import BASE
from tests.images.conftest import EPOCH, policy_for

PROJECT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_real_image_builds_flashes_and_passes_its_selftest(keys, topo, tmp_path):
    cache = Path(os.environ.get("QKDN_IMAGE_CACHE", Path.home() / ".cache/qkdn-images"))
    cache.mkdir(parents=True, exist_ok=True)
    house = build_wheelhouse(PROJECT, cache)
    shipped = {re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in house.glob("*.whl")}
    assert shipped == BASE | {"qkdn"}, "an image carries the node runtime, nothing else"
    spec = BuildSpec(
        topology=topo,
        node=topo.node(2),
        wheelhouse=house,
        version="0.1.0",
        security_version=1,
        epoch=EPOCH,
    )
    bundle = build(spec, keys.release, keys.ring, tmp_path / "real.qkdnb").bundle
    disk = tmp_path / "disk.img"
    target = init_target(disk, 200 << 20, policy_for(keys), slot_size=96 << 20)
    flash(bundle, target)
    result = boot(target, default_health())
    assert result.healthy, result.reason
    commit(target)
