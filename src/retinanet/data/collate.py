"""Batching: collate (image, target) pairs into lists and build the DataLoader.

Images keep their own sizes through collation (multi-scale training gives every image its own size). The model
normalises each image and pads them into one batch itself (RetinaNet.preprocess), so that the padding is zero after
normalisation.
"""

from __future__ import annotations

import random
import signal
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["collate_detection", "make_loader", "seed_worker"]


def _plain_target(image: Tensor, target: dict[str, Any]) -> dict[str, Any]:
    height, width = image.shape[-2:]
    orig_h, orig_w = target["orig_size"]
    return {
        "boxes": target["boxes"].as_subclass(Tensor).float(),
        "labels": target["labels"].as_subclass(Tensor),
        "iscrowd": target["iscrowd"].as_subclass(Tensor),
        "image_id": int(target["image_id"]),
        "orig_size": (int(orig_h), int(orig_w)),
        "size": (int(height), int(width)),
        "scale": (height / orig_h, width / orig_w),
    }


def collate_detection(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """[(image, target)] from a DetectionDataset -> (images, targets), per-image lists of plain tensors.

    images: list of float32 [3, H_i, W_i] in [0, 1] (sizes may differ).
    targets: list of dicts with
        "boxes":     float32 [N_i, 4] XYXY pixels in the transformed image
        "labels":    int64 [N_i] contiguous labels
        "iscrowd":   bool [N_i]
        "image_id":  int
        "orig_size": (H0, W0), the image as stored
        "size":      (H_i, W_i), the image after transforms
        "scale":     (sy, sx) = (H_i / H0, W_i / W0); boxes in the original image are boxes / [sx, sy, sx, sy]
    """
    images = [image.as_subclass(Tensor) for image, _ in batch]
    targets = [_plain_target(image, target) for image, target in zip(images, (t for _, t in batch))]
    return images, targets


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed Python's and NumPy's generators from the worker's torch seed, and leave
    Ctrl-C to the main process.

    torch seeds each worker from the loader's generator; Python's `random` and NumPy are not, and a transform
    that used them would repeat the same draws in every worker. Ctrl-C reaches every process of the terminal's
    group: a worker killed by it would end the main process's last iteration, which saves a checkpoint.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of (images, targets) batches from `collate_detection`, reproducible from `seed`.

    distributed: shard with a DistributedSampler (needs torch.distributed initialised); the training loop must
        call `loader.sampler.set_epoch(epoch)` each epoch for a new shuffle.
    The shuffle order and the workers' random transforms follow from `seed`; with num_workers=0 the transforms
    draw from the main process's torch generator instead. Workers persist across epochs.
    """
    generator = torch.Generator().manual_seed(seed)
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last) if distributed else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_detection,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=seed_worker,
        persistent_workers=num_workers > 0,
    )
