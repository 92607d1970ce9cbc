"""Tiled inference: windows, merging across tile borders (with an oracle detector that boxes what each tile
shows), the predictor's tile option with a real model, and memory that does not grow with the image."""

import pytest
import torch

from retinanet import build_model
from retinanet.inference.predictor import Predictor
from retinanet.inference.tiling import Window, detect_tiled, merge_tiles, tile_windows
from retinanet.ops.postprocess import Detections


def test_windows_cover_the_image_with_the_overlap_and_end_at_its_edges():
    windows = tile_windows(250, 330, tile=100, overlap=0.2)
    assert {w.y0 for w in windows} == {0, 80, 150} and {w.x0 for w in windows} == {0, 80, 160, 230}
    assert all(w.y1 - w.y0 == 100 and w.x1 - w.x0 == 100 for w in windows)  # every tile full size: one batch shape
    covered = torch.zeros(250, 330, dtype=torch.bool)
    for w in windows:
        covered[w.y0 : w.y1, w.x0 : w.x1] = True
    assert covered.all()
    assert tile_windows(60, 90, tile=100) == [Window(0, 0, 60, 90)]  # smaller than a tile: the image itself
    assert len(tile_windows(100, 100, tile=100, overlap=0.5)) == 1
    for tile, overlap in [(0, 0.2), (100, 1.0), (100, -0.1)]:
        with pytest.raises(ValueError):
            tile_windows(100, 100, tile, overlap)


class Oracle:
    """A detector that finds the objects drawn into a coordinate image (channel 0 = x / W, channel 1 = y / H, so a
    crop tells where it lies), boxing the part of each object the crop shows, as a real detector boxes a cut
    object; parts under 10% of an object are not seen. Records the batch sizes it is called with."""

    def __init__(self, objects: list[tuple[list[float], int]], height: int, width: int):
        self.objects, self.height, self.width = objects, height, width
        self.batches: list[int] = []

    def image(self) -> torch.Tensor:
        ys = torch.arange(self.height, dtype=torch.float64)[:, None].expand(self.height, self.width)
        xs = torch.arange(self.width, dtype=torch.float64)[None, :].expand(self.height, self.width)
        return torch.stack([xs / self.width, ys / self.height, torch.zeros_like(xs)]).float()

    def __call__(self, crops: list[torch.Tensor]) -> list[Detections]:
        self.batches.append(len(crops))
        return [self._detect(c) for c in crops]

    def _detect(self, crop: torch.Tensor) -> Detections:
        x0, y0 = round(float(crop[0, 0, 0]) * self.width), round(float(crop[1, 0, 0]) * self.height)
        h, w = crop.shape[-2:]
        boxes, scores, labels = [], [], []
        for (bx1, by1, bx2, by2), label in self.objects:
            vx1, vy1, vx2, vy2 = max(bx1, x0), max(by1, y0), min(bx2, x0 + w), min(by2, y0 + h)
            seen = max(vx2 - vx1, 0) * max(vy2 - vy1, 0) / ((bx2 - bx1) * (by2 - by1))
            if seen >= 0.1:
                boxes.append([vx1 - x0, vy1 - y0, vx2 - x0, vy2 - y0])
                scores.append(0.5 + 0.4 * seen)
                labels.append(label)
        return Detections(
            torch.tensor(boxes).reshape(-1, 4), torch.tensor(scores), torch.tensor(labels, dtype=torch.long)
        )


def _tiled(objects, height=250, width=330, tile=100, overlap=0.2, batch_size=4):
    oracle = Oracle(objects, height, width)
    found = detect_tiled(oracle.image(), oracle, tile, overlap, batch_size)
    return found, oracle


def _as_set(d: Detections) -> set:
    return {(tuple(round(v, 3) for v in b), int(k)) for b, k in zip(d.boxes.tolist(), d.labels.tolist())}


@pytest.mark.parametrize(
    "box",
    [
        [90.0, 20.0, 102.0, 40.0],  # across the inner border x=100 of tile 0, whole in tile 1 (starts at 80)
        [70.0, 70.0, 95.0, 95.0],  # at the corner of four tiles, whole only in the one starting at (80, 80)
        [60.0, 110.0, 130.0, 140.0],  # 70 px wide: cut in both tiles that hold it (stride 80, overlap 20)
        [40.0, 30.0, 290.0, 60.0],  # wider than any tile: stitched from its pieces in four tiles
    ],
    ids=["whole-in-a-neighbour", "four-tile-corner", "cut-in-both", "wider-than-a-tile"],
)
def test_an_object_across_tile_borders_is_found_once_with_its_full_box(box):
    found, _ = _tiled([(box, 1)])
    assert _as_set(found) == {(tuple(box), 1)}


def test_neighbouring_objects_and_classes_stay_apart():
    objects = [
        ([85.0, 10.0, 99.0, 30.0], 0),
        ([101.0, 10.0, 115.0, 30.0], 0),  # touching at the border x=100
        ([86.0, 50.0, 112.0, 70.0], 0),
        ([88.0, 52.0, 110.0, 68.0], 2),  # one box over the other, another class
        ([200.0, 200.0, 220.0, 230.0], 1),  # one tile only: what a tile alone sees is kept as it is
    ]
    found, _ = _tiled(objects)
    assert _as_set(found) == {(tuple(b), k) for b, k in objects}
    assert found.scores.tolist() == sorted(found.scores.tolist(), reverse=True)


def test_tiles_are_batched_and_empty_results_are_fine():
    found, oracle = _tiled([], batch_size=5)
    assert len(found.scores) == 0 and found.boxes.shape == (0, 4)
    assert oracle.batches == [5, 5, 2]  # 12 tiles, 5 per call


def test_merge_tiles_checks_its_input():
    with pytest.raises(ValueError, match="2 sets of detections for 1 tiles"):
        empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
        merge_tiles([empty, empty], [Window(0, 0, 10, 10)], (10, 10))


# ----------------------------------------------------------------------------------------------------------------
def _tiny(size: int = 128):
    torch.manual_seed(0)
    model = build_model("retinanet_tiny", num_classes=3, min_size=size, max_size=size).eval()
    torch.nn.init.normal_(model.head.cls_logits.weight, std=0.03)  # spread scores: untrained heads find nothing
    torch.nn.init.zeros_(model.head.cls_logits.bias)
    return model


def test_predictor_tiles_carry_their_offsets():
    """Tiles without overlap share no pixels, so nothing is merged: the tile holding a picture finds in it what
    the picture alone gives, shifted by the tile's offset."""
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    picture = (torch.rand(3, 128, 128, generator=g) * 255).to(torch.uint8)
    canvas = torch.zeros(3, 256, 384, dtype=torch.uint8)
    canvas[:, 128:, 256:] = picture
    alone = Predictor(model, score_thresh=0.3).predict(picture)
    tiled = Predictor(model, score_thresh=0.3, tile=128, overlap=0.0, batch_size=4).predict(canvas)
    inside = (tiled.boxes[:, 0] >= 256) & (tiled.boxes[:, 1] >= 128)
    shifted = alone.boxes + torch.tensor([256.0, 128.0, 256.0, 128.0])
    assert len(alone) > 0 and inside.sum() == len(alone)
    assert torch.allclose(tiled.boxes[inside], shifted, atol=1e-4)
    assert torch.equal(tiled.labels[inside], alone.labels) and tiled.image_size == (256, 384)


def test_a_tile_as_large_as_the_image_is_the_untiled_prediction():
    model = _tiny()
    image = (torch.rand(3, 100, 120) * 255).to(torch.uint8)
    a = Predictor(model, score_thresh=0.2).predict(image)
    b = Predictor(model, score_thresh=0.2, tile=200).predict(image)
    assert len(a) > 0 and torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)


def _peak_extra_bytes(fn) -> int:
    """Peak of the bytes PyTorch's CPU allocator held during fn() above what it held before (the profiler's
    allocation events, summed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@pytest.mark.slow
def test_tiling_a_huge_image_keeps_memory_bounded():
    """A 4096 x 4096 image (a float copy of it: 201 MB) in tiles of 512 px, 4 per pass, with a model at 64 px: the
    memory used beyond the uint8 image is that of a 1024 x 1024 image, and far below one float copy."""
    model = _tiny(64)
    predictor = Predictor(model, score_thresh=0.5, tile=512, overlap=0.2, batch_size=4)
    predictor.predict(torch.zeros(3, 512, 512, dtype=torch.uint8))  # first-call set-up (layout probe) not counted
    small = torch.randint(0, 255, (3, 1024, 1024), dtype=torch.uint8)
    huge = torch.randint(0, 255, (3, 4096, 4096), dtype=torch.uint8)
    peak_small = _peak_extra_bytes(lambda: predictor.predict(small))
    peak_huge = _peak_extra_bytes(lambda: predictor.predict(huge))
    float_copy = 3 * 4096 * 4096 * 4
    assert peak_huge < float_copy / 8, (peak_huge, float_copy)
    assert peak_huge < 1.5 * peak_small + (4 << 20), (peak_huge, peak_small)
