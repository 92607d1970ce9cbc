import os
import tempfile

# the fast paths' measurements (retinanet.fastpath) go to an empty folder of this test session, never the user's
# cache (nor one RETINANET_CACHE_DIR points at): no test depends on what a machine has measured before. Subprocesses
# (the CLI, torchrun) inherit it.
os.environ["RETINANET_CACHE_DIR"] = tempfile.mkdtemp(prefix="retinanet-test-cache-")
# torch's OpenMP threads spin while they wait; on a 2-core machine shared with DataLoader workers or DDP processes
# that turns into 10x slowdowns. Passive waiting must be chosen before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
