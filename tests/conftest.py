import os
import sys
from pathlib import Path

# The Triton kernels are tested in Triton's interpreter on a CPU: the mode is fixed when a kernel is defined, so it
# is set before anything imports them. TRIATTN_TEST_DEVICE=cuda runs the kernel, static-cache, GPU-plan and int4
# tests compiled on the GPU instead (on the device).
TEST_DEVICE = os.environ.get("TRIATTN_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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
