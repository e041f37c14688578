"""The pictures the tasks write: palette masks, untinted backgrounds with a legend, non-overlapping detection labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from davit.tasks.detection.predict import draw_detections
from davit.tasks.segmentation.inference import background_classes, mask_image, overlay, palette, write_prediction
from davit.visualize import distinct_colours, draw_legend, place_labels


# ------------------------------------------------------------------------------------------------ shared helpers
def test_distinct_colours_are_fixed_and_distinct() -> None:
    a, b = distinct_colours(200), distinct_colours(200)
    assert a.shape == (200, 3) and a.dtype == np.uint8 and (a == b).all()
    assert (distinct_colours(5) == a[:5]).all()  # the first colours do not depend on n
    assert len({tuple(c) for c in a.tolist()}) == 200


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def test_labels_of_stacked_boxes_do_not_overlap_and_the_first_gets_its_preferred_spot() -> None:
    boxes = [(50.0, 50.0, 150.0, 150.0), (52.0, 48.0, 152.0, 148.0), (49.0, 53.0, 149.0, 153.0), (51, 51, 151, 151)]
    sizes = [(60, 12)] * 4
    spots = place_labels(boxes, sizes, 300, 300)
    assert spots[0] == (50.0, 38.0, 110.0, 50.0)  # above the top-left corner
    for i in range(4):
        x1, y1, x2, y2 = spots[i]
        assert 0 <= x1 and x2 <= 300 and 0 <= y1 and y2 <= 300 and (x2 - x1, y2 - y1) == sizes[i]
        for j in range(i):
            assert _overlap(spots[i], spots[j]) == 0, (i, j)


def test_labels_stay_inside_the_image() -> None:
    spots = place_labels([(0.0, 0.0, 20.0, 20.0), (90.0, 90.0, 100.0, 100.0)], [(30, 10), (30, 10)], 100, 100)
    for x1, y1, x2, y2 in spots:
        assert 0 <= x1 <= x2 <= 100 and 0 <= y1 <= y2 <= 100


def test_legend_panel_lists_each_entry_with_its_colour() -> None:
    img = Image.new("RGB", (40, 30), (10, 10, 10))
    out = draw_legend(img, [("cat 60.0%", (255, 0, 0)), ("dog 40.0%", (0, 0, 255))], font_size=12)
    arr = np.asarray(out)
    assert out.width > 40 and out.height >= 30 and (arr[:30, :40] == 10).all()
    panel = arr[:, 40:].reshape(-1, 3).tolist()
    assert [255, 0, 0] in panel and [0, 0, 255] in panel


# ------------------------------------------------------------------------------------------------ segmentation
def test_mask_png_keeps_class_indices_and_shows_colours(tmp_path) -> None:
    mask = np.zeros((6, 8), np.int64)
    mask[1:3, 2:5] = 1
    mask[4, :] = 2
    mask[5, 0] = 255
    colours = palette(3)
    mask_image(mask, colours, background=(0,)).save(tmp_path / "m.png")
    back = Image.open(tmp_path / "m.png")
    assert back.mode == "P"
    assert (np.asarray(back) == mask).all()  # indices survive: tools read the classes back
    rgb = np.asarray(back.convert("RGB"))
    assert (rgb[mask == 0] == 0).all()  # background black
    assert (rgb[mask == 1] == colours[1]).all() and (rgb[mask == 2] == colours[2]).all()
    assert (rgb[5, 0] == 255).all()  # ignore white
    assert colours[1].tolist() != colours[2].tolist() and colours[1].any()


def test_overlay_leaves_background_untinted_and_tints_objects() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    mask = np.zeros((10, 12), np.int64)
    mask[2:6, 3:9] = 1
    mask[0, 0] = 255
    out = overlay(image, mask, palette(2), background=(0,))
    assert (out[mask != 1] == image[mask != 1]).all()
    assert not (out[mask == 1] == image[mask == 1]).all()
    # without a background class everything but the ignore pixel is tinted
    out_all = overlay(image, mask, palette(2))
    assert not (out_all[mask == 0] == image[mask == 0]).all() and (out_all[0, 0] == image[0, 0]).all()


def test_background_classes_by_name() -> None:
    assert background_classes(["Background", "cat", "void", "dog"]) == (0, 2)
    assert background_classes(["wall", "floor"]) == ()


def test_write_prediction_draws_a_legend_of_the_classes_present(tmp_path) -> None:
    image = np.full((40, 50, 3), 128, np.uint8)
    mask = np.zeros((40, 50), np.int64)
    mask[10:30, 10:40] = 2
    colours = palette(3)
    m, o = write_prediction(image, mask, tmp_path, "x", colours, ["background", "disk", "rectangle"])
    ov = Image.open(o)
    assert ov.width > 50 and ov.mode == "RGB"
    arr = np.asarray(ov)
    assert (arr[:40, :50][mask == 0] == 128).all()  # the background is not tinted
    panel = {tuple(p) for p in arr[:, 50:].reshape(-1, 3).tolist()}
    assert tuple(colours[2].tolist()) in panel  # rectangle's swatch
    assert tuple(colours[1].tolist()) not in panel  # no disk in the mask: not in the legend
    assert (np.asarray(Image.open(m)) == mask).all()


# ------------------------------------------------------------------------------------------------ detection
def test_detection_top_score_is_drawn_on_top() -> None:
    img = torch.full((3, 120, 160), 200, dtype=torch.uint8)
    box = [20.0, 30.0, 100.0, 110.0]
    out = {
        "boxes": torch.tensor([box, box, box]),
        "labels": torch.tensor([1, 2, 3]),
        "scores": torch.tensor([0.6, 0.9, 0.7]),  # the middle one is best
    }
    drawn = draw_detections(img, out, ["a", "b", "c"], score_thr=0.5)
    colours = distinct_colours(20)
    # the shared box outline has the best detection's colour (label 2)
    assert drawn[:, 70, 20].tolist() == colours[1].tolist()
    # three labels, three distinct spots: each class colour fills a separate label rectangle
    for k in (0, 1, 2):
        hit = (drawn.permute(1, 2, 0) == torch.as_tensor(colours[k])).all(-1)
        assert int(hit.sum()) > 60, k  # more than a box outline's pixels: the label background is visible


def test_detection_below_threshold_returns_the_image() -> None:
    img = torch.zeros(3, 20, 20, dtype=torch.uint8)
    out = {"boxes": torch.tensor([[1.0, 1, 5, 5]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.1])}
    assert torch.equal(draw_detections(img, out, ["a"], score_thr=0.5), img)


@pytest.mark.parametrize("n", [1, 30])
def test_many_detections_draw(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    xy = torch.rand(n, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 30], 1)
    out = {"boxes": boxes, "labels": torch.randint(1, 4, (n,), generator=g), "scores": torch.rand(n, generator=g)}
    out["masks"] = torch.rand(n, 1, 128, 128, generator=g)
    drawn = draw_detections(torch.zeros(3, 128, 128, dtype=torch.uint8), out, ["a", "b", "c"], score_thr=0.0)
    assert drawn.shape == (3, 128, 128) and drawn.dtype == torch.uint8 and drawn.any()
