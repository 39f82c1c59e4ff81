import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MKL picks its kernels by CPU. On AMD EPYC hosts its fast paths round a transposed and a plain
# product of the same numbers differently, and the GaLore-vs-galore-torch tests (same operations,
# rounding-level tolerance; an SVD basis amplifies any difference) failed by ~1e-3 on an AMD EPYC
# host, having passed on the hosts of earlier runs. Conditional Numerical Reproducibility makes
# every host compute alike.
# Set before torch is imported (MKL reads it once), and inherited by the torchrun workers.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")


@pytest.fixture
def repo_root() -> Path:
    return REPO
