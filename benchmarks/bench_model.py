"""RetinaNet ResNet-50-FPN, ours against torchvision's, in one run: a training step and inference.

Config: 2 images of 512x512, 80 classes, 5 boxes each; both models resize to 512 (min_size = max_size = 512), use
frozen BatchNorm and train layer2..layer4 (torchvision's setup for a pretrained backbone; ours freeze_at=2).
Each model as its builder gives it: torchvision's v1 computes P6 from P5 (ours, as the paper, from C5: a 3x3 conv
on 2048 channels instead of 256, more work for ours), pads to 32 (ours 128; the same at 512x512), uses an L1 box
loss (ours smooth L1) and keeps 300 detections (ours 100). Rows: torchvision float32; ours float32 with its
defaults (channels-last, frozen BN folded, Winograd F(4x4, 3x3) for the large 3x3 convolutions on the CPU); ours
float32 with torch's convolutions everywhere (conv_algorithm="direct"); ours under bfloat16 autocast. Times are
medians over --repeats rounds, each round timing every model once in turn. Agreement of the defaults' and bf16's
detections with those of torch's convolutions is measured on untrained weights with the class bias zeroed, where
scores are close to each other, so it is a lower bound on agreement for a trained model. Also: peak memory of a
training step on one 1024x1024 image with 1,000 boxes against the same image with 10 boxes.

    python benchmarks/bench_model.py [--repeats 5] [--device cpu|cuda] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torchvision.models import resnet50
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_median_times, peak_extra_cpu_bytes, peak_extra_cuda_bytes, write_section  # noqa: E402

from retinanet import build_model  # noqa: E402


def torchvision_model(num_classes: int, size: int) -> TVRetinaNet:
    """torchvision's retinanet_resnet50_fpn as built for a pretrained backbone (FrozenBatchNorm2d, 3 trainable
    stages), without downloading anything."""
    backbone = _resnet_fpn_extractor(
        resnet50(norm_layer=FrozenBatchNorm2d), 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    return TVRetinaNet(backbone, num_classes, min_size=size, max_size=size)


def make_data(n_images: int, size: int, n_boxes: int, num_classes: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n_images):
        images.append(torch.rand(3, size, size, generator=g).to(device))
        xy = torch.rand(n_boxes, 2, generator=g) * size * 0.8
        wh = 16 + torch.rand(n_boxes, 2, generator=g) * size * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        labels = torch.randint(0, num_classes, (n_boxes,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def spread_scores(model) -> None:
    """Random heads score every anchor at the prior (0.01 < 0.05): no detections. Zero the class bias so that
    inference does its full work (top-k, decoding, NMS) in both models."""
    head = model.head.classification_head.cls_logits if hasattr(model.head, "classification_head") else model.head.cls_logits
    torch.nn.init.zeros_(head.bias)


def train_step_fn(model, images, targets, ours: bool, autocast):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def step():
        if not model.training:  # as a training loop: train() once, not every step (it drops the folded-BN cache)
            model.train()
        with autocast():
            losses = model.loss(images, targets) if ours else model(images, targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    return step


def infer_fn(model, images, ours: bool, autocast):
    def infer():
        if model.training:
            model.eval()
        with torch.no_grad(), autocast():
            return model.predict(images) if ours else model(images)

    return infer


def agreement(reference, other, iou: float = 0.9) -> float:
    """Share of the reference's detections that the other set has too (same label, IoU >= iou)."""
    found = total = 0
    for r, o in zip(reference, other):
        total += len(r.scores)
        if len(r.scores) and len(o.scores):
            ious = box_iou(r.boxes.float(), o.boxes.float())
            same = r.labels[:, None] == o.labels[None, :]
            found += int(((ious >= iou) & same).any(1).sum())
    return found / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--skip-dense", action="store_true", help="skip the 1024x1024 dense-scene memory test")
    args = parser.parse_args()
    dev, size, num_classes = args.device, 512, 80
    sync = torch.cuda.synchronize if dev == "cuda" else None
    fast_dtype = torch.bfloat16
    fp32 = contextlib.nullcontext
    fast = lambda: torch.autocast(dev, dtype=fast_dtype)  # noqa: E731

    images, targets = make_data(2, size, 5, num_classes, dev)
    torch.manual_seed(0)
    tv = torchvision_model(num_classes, size).to(dev)
    ours = build_model("retinanet_r50_fpn", num_classes=num_classes, min_size=size, max_size=size).to(dev)
    variants = {"direct": {"conv_algorithm": "direct"}, "bf16": {}}
    others = {}
    for key, overrides in variants.items():
        others[key] = build_model(
            "retinanet_r50_fpn", num_classes=num_classes, min_size=size, max_size=size, **overrides
        ).to(dev)
        others[key].load_state_dict(ours.state_dict())
    for m in (tv, ours, *others.values()):
        spread_scores(m)
    # agreement of each setting's detections with float32 direct convolution, on the same (untrained,
    # score-spread) weights
    for m in (ours, *others.values()):
        m.eval()
    reference = infer_fn(others["direct"], images, True, fp32)()
    agree_default = agreement(reference, infer_fn(ours, images, True, fp32)())
    agree_bf16 = agreement(reference, infer_fn(others["bf16"], images, True, fast)())

    configs = [("torchvision RetinaNet, float32", tv, False, fp32),
               ("retinanet, float32, the defaults (channels-last, frozen BN folded, Winograd 3x3 convolutions on the "
                "CPU)", ours, True, fp32),
               ("retinanet, float32, conv_algorithm='direct' (torch's convolutions)", others["direct"], True, fp32),
               ("retinanet, bf16 autocast", others["bf16"], True, fast)]  # fmt: skip
    # every round times each model once, in turn: drift of the machine's speed during the run hits all alike
    train_times = interleaved_median_times(
        [train_step_fn(model, images, targets, is_ours, ac) for _, model, is_ours, ac in configs],
        args.repeats, warmup=1, sync=sync,
    )
    infer_times = interleaved_median_times(
        [infer_fn(model, images, is_ours, ac) for _, model, is_ours, ac in configs], args.repeats, warmup=1, sync=sync
    )
    rows = [(name, t_train, t_inf) for (name, *_), t_train, t_inf in zip(configs, train_times, infer_times)]
    for name, t_train, t_inf in rows:
        print(f"{name:<50} train step {t_train * 1e3:8.1f} ms   inference {t_inf * 1e3:8.1f} ms", flush=True)

    n_ref = sum(len(d.scores) for d in reference)
    lines = [
        f"Device: {dev}. ResNet-50-FPN, 2 images of {size}x{size}, 80 classes, 5 boxes each; training step = loss,",
        "backward, SGD step; inference = preprocessing to detections. Median of "
        f"{args.repeats} rounds after a warm-up, each round timing every row once in turn.",
        "",
        "| model | training step (ms) | vs torchvision | inference (ms) | vs torchvision |",
        "|---|---:|---:|---:|---:|",
    ]
    ref = rows[0]
    for name, t_train, t_inf in rows:
        lines.append(f"| {name} | {t_train * 1e3:.0f} | {ref[1] / t_train:.2f}x | {t_inf * 1e3:.0f} | {ref[2] / t_inf:.2f}x |")
    lines += ["", f"Detections of float32 with torch's convolutions ({n_ref}, untrained weights with near-tied scores) "
              "that the other settings also find (same label, IoU >= 0.9): the defaults "
              f"{agree_default:.1%}, bf16 autocast {agree_bf16:.1%}."]  # fmt: skip

    if not args.skip_dense:
        lines += ["", dense_scene(dev, args.repeats)]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(f"model-{dev}", "## RetinaNet ResNet-50-FPN: training step and inference against torchvision\n\n" + text)


def dense_scene(dev: str, repeats: int) -> str:
    """Peak memory of one training step on a 1024x1024 image with 1,000 boxes vs 10 boxes, ours and torchvision's."""
    peak = peak_extra_cuda_bytes if dev == "cuda" else peak_extra_cpu_bytes
    out = ["Dense scene: peak extra memory of one training step (loss + backward), one 1024x1024 image.", "",
           "| model | 10 boxes (MiB) | 1,000 boxes (MiB) | ratio |", "|---|---:|---:|---:|"]  # fmt: skip
    for name in ("retinanet", "torchvision RetinaNet"):
        torch.manual_seed(0)
        if name == "retinanet":
            model = build_model("retinanet_r50_fpn", num_classes=80, min_size=1024, max_size=1024).to(dev).train()
        else:
            model = torchvision_model(80, 1024).to(dev).train()
        result = []
        for n_boxes in (10, 1000):
            images, targets = make_data(1, 1024, n_boxes, 80, dev, seed=1)

            def step():
                losses = model.loss(images, targets) if name == "retinanet" else model(images, targets)
                sum(losses.values()).backward()
                model.zero_grad(set_to_none=True)

            step()  # warm-up: allocator and anchor caches
            result.append(peak(step))
        out.append(f"| {name} | {result[0] / 2**20:.0f} | {result[1] / 2**20:.0f} | {result[1] / result[0]:.2f}x |")
        print(out[-1], flush=True)
    return "\n".join(out)


if __name__ == "__main__":
    main()
