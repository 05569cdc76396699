import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(arch) → path of a tiny random-init model directory (built once per arch)."""
    from triattn_local.tiny_model import make_model

    built = {}

    def make(arch: str = "qwen3", **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in built:
            built[key] = make_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **overrides)
        return built[key]

    return make


@pytest.fixture
def reference_stats_dir():
    d = SHARED / "reference-stats"
    if not d.is_dir():
        pytest.skip(f"reference stats not found at {d} (../shared is absent in this checkout)")
    return d
