"""How long `triattn --help` and each subcommand's help take (target: ≤ 0.3 s), median of several runs.

    python benchmarks/cli_startup.py
"""

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [[], ["run"], ["calibrate"], ["stats"], ["stats", "show"], ["stats", "import"], ["stats", "export"],
            ["doctor"]]


def main(runs: int = 7) -> None:
    local = Path(sys.executable).parent / "triattn"  # the installed script itself, not a version-manager shim
    exe = str(local) if local.exists() else shutil.which("triattn")
    if exe is None:
        sys.exit("triattn is not on PATH: pip install -e . first")
    worst = 0.0
    for cmd in COMMANDS:
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run([exe, *cmd, "--help"], capture_output=True, check=True)
            times.append(time.perf_counter() - t)
        median = statistics.median(times)
        worst = max(worst, median)
        print(f"triattn {' '.join(cmd + ['--help']):28s} median {median * 1000:6.0f} ms")
    print(f"slowest median: {worst * 1000:.0f} ms ({'within' if worst <= 0.3 else 'OVER'} the 300 ms target)")


if __name__ == "__main__":
    main()
