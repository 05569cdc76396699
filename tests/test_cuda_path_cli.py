"""`triattn bench` and `triattn doctor` on the CUDA path, as seen from a machine without a GPU."""

import pytest

from test_cli import assert_one_line_error, triattn
from triattn_local.doctor import cuda_kernel_note


def test_bench_has_help():
    r = triattn("bench", "--help")
    assert r.returncode == 0 and "--budget" in r.stdout and "--memory-gib" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["--shape", "qwen9-1t"], ["unknown shape", "qwen3-8b"]),
    (["--context", "4k"], ["comma-separated integers"]),
    (["--batch", "0"], ["positive"]),
])
def test_bench_rejects_bad_input_before_looking_for_a_gpu(args, words):
    assert_one_line_error(triattn("bench", *args), *words)


def test_bench_without_a_gpu_says_so():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    assert_one_line_error(triattn("bench"), "CUDA")


def test_doctor_names_the_architecture_and_what_is_tested():
    assert "Hopper" in cuda_kernel_note(9, 0) and "tested" in cuda_kernel_note(9, 0)
    assert "untested" in cuda_kernel_note(8, 9) and "RTX 40" in cuda_kernel_note(8, 9)
    assert "GB10" in cuda_kernel_note(12, 1) and "untested" in cuda_kernel_note(12, 1)
    assert "fallbacks" in cuda_kernel_note(7, 5)
