import os
import tempfile

# the fast paths' measurements (retinanet.runtime.fastpath) go to an empty folder of this test session, never the user's
# cache (nor one RETINANET_CACHE_DIR points at): no test depends on what a machine has measured before. Subprocesses
# (the CLI, torchrun) inherit it.
os.environ["RETINANET_CACHE_DIR"] = tempfile.mkdtemp(prefix="retinanet-test-cache-")
# torch's OpenMP threads spin while they wait; on a 2-core machine shared with DataLoader workers or DDP processes
# that turns into 10x slowdowns. Passive waiting must be chosen before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# two processes on this machine under torchrun (the start of a command line; the script or `-m module` follows)
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------------------------------
# A run that trains in seconds on a 2-core CPU: the tiny preset on 64 px synthetic images. Tests that train through
# the command line or a run config start from it and override what they test (`tiny_run`, `write_run_config`).
TINY_RUN = {
    "model": {"preset": "retinanet_tiny", "min_size": 64, "max_size": 64},
    "data": {"format": "synthetic", "synthetic_train_images": 8, "synthetic_val_images": 4, "synthetic_image_size": 64},
    "train": {
        "max_iters": 3,
        "batch_size": 2,
        "num_workers": 0,
        "warmup_iters": 1,
        "lr": 0.001,
        "log_every": 1,
        "checkpoint_every": 2,
        "device": "cpu",
    },
}


def tiny_settings() -> list[str]:
    """TINY_RUN as `--set` items (model.preset first: a preset replaces the model keys before it)."""
    return [f"{section}.{key}={value}" for section, values in TINY_RUN.items() for key, value in values.items()]


def tiny_run(output, *extra: str) -> list[str]:
    """`--set` and its items for `retinanet train`: TINY_RUN writing to `output`, then `extra` overrides."""
    return ["--set", *tiny_settings(), f"train.output_dir={output}", *extra]


def write_run_config(path, **sections) -> str:
    """A run config YAML at `path`: TINY_RUN with each section's keys updated by `sections` (section=dict)."""
    import yaml

    data = {name: {**values, **sections.get(name, {})} for name, values in TINY_RUN.items()}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def wait_for_first_iteration(run, timeout: float = 120.0) -> None:
    """Wait until the training run writing to folder `run` has logged an iteration (log.jsonl is opened before
    the loop starts: its existence alone says nothing), then a second more."""
    import time

    deadline = time.time() + timeout
    log = run / "log.jsonl"
    while time.time() < deadline and not (log.exists() and '"iter"' in log.read_text()):
        time.sleep(0.2)
    time.sleep(1.0)
