"""Fixtures for the pytest-benchmark suite (run: pytest benchmarks/ --benchmark-only)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = ROOT / "msld_sdk" / "samples" / "lidc_0974_n0_s2" / "image.png"


@pytest.fixture(scope="session")
def segmenter():
    from msld_sdk import Segmenter
    return Segmenter()


@pytest.fixture(scope="session")
def image01():
    from msld_sdk.image_input import load_image
    return load_image(SAMPLE)
