"""Anchor boxes over the FPN levels P3..P7.

Anchors are laid out in the order the head's outputs are flattened, level by level:

    for level in levels:                      # P3 first
        for y in range(H): for x in range(W):   # locations row-major
            for ratio in aspect_ratios:         # then aspect-ratio-major
                for size in sizes:              # then size
                    anchor

so anchor i of a level sits at location i // A (row-major) and is of anchor type i % A, A = len(ratios) * len(sizes).
This is torchvision's order, which lets torchvision's RetinaNet weights be used unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from retinanet.config import ModelConfig

__all__ = [
    "AnchorGenerator",
    "NUM_LEVELS",
    "PAPER_SIZES_PER_LEVEL",
    "TORCHVISION_SIZES_PER_LEVEL",
    "anchor_generator",
    "grid_sizes",
]

NUM_LEVELS = 5  # P3..P7

_BASE_SIZES = (32, 64, 128, 256, 512)
# The paper: three scales 2^0, 2^(1/3), 2^(2/3) of the base size per level.
PAPER_SIZES_PER_LEVEL: tuple[tuple[float, ...], ...] = tuple(
    tuple(x * 2 ** (i / 3) for i in range(3)) for x in _BASE_SIZES
)
# torchvision truncates the scaled sizes to integers: (32, 40, 50) at P3.
TORCHVISION_SIZES_PER_LEVEL: tuple[tuple[int, ...], ...] = tuple(
    (x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in _BASE_SIZES
)
_CACHE_ENTRIES = 16


class AnchorGenerator:
    """Anchors of every level of one (padded) image size; the same for every image of a batch.

    Args:
        sizes_per_level: per level, the anchor sizes (sqrt of the area, pixels) of that level; every level must have
            as many sizes, because the head is shared across levels. Default: the paper's.
        aspect_ratios: height / width ratios, shared by all levels.
        strides: per level, the stride in pixels of its grid (8 .. 128 for P3..P7). None: torchvision's rule, the
            stride of a level on each axis is padded image size // grid size.
        offset: anchor centre of grid cell (x, y) is ((x + offset) * stride_x, (y + offset) * stride_y); 0.5 puts it in
            the middle of the cell, 0.0 (torchvision) at its top-left corner.
        round_base: round the zero-centred base anchors to integers (torchvision does).
    """

    def __init__(
        self,
        *,
        sizes_per_level: Sequence[Sequence[float]] = PAPER_SIZES_PER_LEVEL,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        strides: Sequence[int] | None = (8, 16, 32, 64, 128),
        offset: float = 0.5,
        round_base: bool = False,
    ) -> None:
        self.sizes_per_level = tuple(tuple(float(s) for s in sizes) for sizes in sizes_per_level)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.strides = None if strides is None else tuple(int(s) for s in strides)
        self.offset = float(offset)
        self.round_base = bool(round_base)
        self._check_args()
        self.base_anchors_per_level = [self._base_anchors(sizes) for sizes in self.sizes_per_level]
        self._cache: dict[tuple, Tensor] = {}

    @classmethod
    def torchvision_style(cls) -> "AnchorGenerator":
        """Exactly the anchors of torchvision's RetinaNet: integer sizes (32, 40, 50), ..., ratios (0.5, 1, 2),
        rounded base anchors, centres at (x * stride, y * stride), strides = padded size // grid size."""
        return cls(
            sizes_per_level=TORCHVISION_SIZES_PER_LEVEL,
            aspect_ratios=(0.5, 1.0, 2.0),
            strides=None,
            offset=0.0,
            round_base=True,
        )

    def _check_args(self) -> None:
        if not self.sizes_per_level or not self.aspect_ratios:
            raise ValueError("sizes_per_level and aspect_ratios must not be empty")
        counts = [len(sizes) for sizes in self.sizes_per_level]
        if len(set(counts)) != 1 or counts[0] == 0:
            raise ValueError(f"every level needs the same, non-zero number of sizes (shared head), got {counts}")
        for level, sizes in enumerate(self.sizes_per_level):
            if any(not s > 0 for s in sizes):
                raise ValueError(f"anchor sizes must be > 0, got {sizes} at level {level}")
        if any(not r > 0 for r in self.aspect_ratios):
            raise ValueError(f"aspect ratios must be > 0, got {self.aspect_ratios}")
        if self.strides is not None and len(self.strides) != len(self.sizes_per_level):
            raise ValueError(f"{len(self.strides)} strides for {len(self.sizes_per_level)} levels of sizes")

    def _base_anchors(self, sizes: tuple[float, ...]) -> Tensor:
        """[A, 4] float64 zero-centred anchors of one level, ratio-major then size (torchvision's order)."""
        # torchvision computes them in float32 and rounds; do the same so that the rounding matches bit for bit
        dtype = torch.float32 if self.round_base else torch.float64
        scales = torch.tensor(sizes, dtype=dtype)
        h_ratios = torch.sqrt(torch.tensor(self.aspect_ratios, dtype=dtype))
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return (base.round() if self.round_base else base).to(torch.float64)

    @property
    def num_levels(self) -> int:
        return len(self.sizes_per_level)

    def num_anchors_per_location(self) -> int:
        """A = len(aspect_ratios) * sizes per level: anchors at each location of every level."""
        return len(self.aspect_ratios) * len(self.sizes_per_level[0])

    def strides_for(self, grid_sizes: list[tuple[int, int]], image_size_hw: tuple[int, int]) -> list[tuple[int, int]]:
        """Per level the (y, x) stride of its grid: the fixed strides, or padded image size // grid size."""
        if self.strides is not None:
            return [(s, s) for s in self.strides]
        height, width = image_size_hw
        strides = [(height // gh, width // gw) for gh, gw in grid_sizes]
        for level, (sh, sw) in enumerate(strides):
            if sh <= 0 or sw <= 0:
                raise ValueError(f"grid {grid_sizes[level]} of level {level} is larger than the image {image_size_hw}")
        return strides

    def level_anchors(self, base: Tensor, grid_hw: tuple[int, int], stride_hw: tuple[int, int]) -> Tensor:
        """[H*W*A, 4] float64 anchors of one level, locations row-major, then the A anchor types."""
        (gh, gw), (sh, sw) = grid_hw, stride_hw
        ys = (torch.arange(gh, dtype=torch.float64) + self.offset) * sh
        xs = (torch.arange(gw, dtype=torch.float64) + self.offset) * sw
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)
        return (centres + base.view(1, -1, 4)).reshape(-1, 4)

    def _all_anchors(
        self, grid_sizes: list[tuple[int, int]], image_size_hw: tuple[int, int], device, dtype: torch.dtype
    ) -> Tensor:
        grid_sizes = [(int(h), int(w)) for h, w in grid_sizes]
        if len(grid_sizes) != self.num_levels:
            raise ValueError(f"got {len(grid_sizes)} grid sizes for {self.num_levels} anchor levels")
        key = (tuple(grid_sizes), (int(image_size_hw[0]), int(image_size_hw[1])), str(device), dtype)
        if key in self._cache:
            return self._cache[key]
        strides = self.strides_for(grid_sizes, image_size_hw)
        # built once per image size on the CPU in float64 (exact integer centres), then cast and moved
        levels = [self.level_anchors(b, g, s) for b, g, s in zip(self.base_anchors_per_level, grid_sizes, strides)]
        anchors = torch.cat(levels).to(dtype=dtype).to(device)
        if len(self._cache) >= _CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))  # drop the oldest entry
        self._cache[key] = anchors
        return anchors

    def anchors_per_level(
        self,
        grid_sizes: list[tuple[int, int]],
        image_size_hw: tuple[int, int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> list[Tensor]:
        """Anchors of each level.

        Args:
            grid_sizes: per level (P3 first), the feature map's (H, W).
            image_size_hw: the padded batch's (height, width); used for strides only when `strides` is None.
        Returns:
            per level a [H*W*A, 4] `dtype` tensor of XYXY anchors in pixels, in the module docstring's order.
            They are cached views: do not modify them in place.
        """
        anchors = self._all_anchors(grid_sizes, image_size_hw, device, dtype)
        counts = [int(h) * int(w) * self.num_anchors_per_location() for h, w in grid_sizes]
        return list(anchors.split(counts))

    def __call__(
        self,
        grid_sizes: list[tuple[int, int]],
        image_size_hw: tuple[int, int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """All levels' anchors concatenated: [sum(H*W*A), 4] `dtype` XYXY (cached: do not modify in place)."""
        return self._all_anchors(grid_sizes, image_size_hw, device, dtype)

    def __repr__(self) -> str:
        return (
            f"AnchorGenerator(sizes_per_level={self.sizes_per_level}, aspect_ratios={self.aspect_ratios}, "
            f"strides={self.strides}, offset={self.offset}, round_base={self.round_base})"
        )


def anchor_generator(cfg: "ModelConfig") -> AnchorGenerator:
    """The AnchorGenerator of a model config: its sizes (per level, or base sizes x scales), ratios, strides, offset
    and rounding."""
    sizes = cfg.anchor_sizes_per_level or tuple(tuple(s * k for k in cfg.anchor_scales) for s in cfg.anchor_sizes)
    return AnchorGenerator(
        sizes_per_level=sizes,
        aspect_ratios=cfg.aspect_ratios,
        strides=None if cfg.anchor_strides_from_image else (8, 16, 32, 64, 128),
        offset=cfg.anchor_offset,
        round_base=cfg.anchor_round_base,
    )


def grid_sizes(padded_hw: tuple[int, int], num_levels: int = NUM_LEVELS) -> list[tuple[int, int]]:
    """The (H, W) of the feature maps P3..P7 of a padded input: every stride-2 layer of the ResNet and of P6/P7
    (3x3 or 1x1, padding 1 or 0) maps n to ceil(n / 2), so level l has ceil(side / 2^l)."""
    return [(-(-padded_hw[0] // 2**level), -(-padded_hw[1] // 2**level)) for level in range(3, 3 + num_levels)]
