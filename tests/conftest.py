import os
import sys
from pathlib import Path

# tests/ holds plain helper modules (tiny_models, served_apps) next to the test folders.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionstart(session):
    # Build the CPU kernels (or load them: a minute the first time on a machine) before any test, so no test, and
    # no verifier replica an integration test starts, waits for the build inside its own time limit.
    from specserve.actors.engine import cpu_kernels

    cpu_kernels.kernels()
