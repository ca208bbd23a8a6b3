"""The shared preprocessing path: geometry and burned-in label masking."""

from __future__ import annotations

import numpy as np
import pytest

from models.data.preprocess import Geometry, mask_burned_in_labels, to_model_input


def radiograph_with_marker() -> np.ndarray:
    """A dark field, a grey 'hand' with a saturated dense-bone spot inside it, and a white 'L' on a dark box."""
    img = np.full((200, 160), 0.08, dtype=np.float32)
    img[40:190, 50:120] = 0.45                      # soft tissue
    img[90:120, 70:100] = 0.8                       # a carpal bone
    img[100:108, 80:88] = 1.0                       # its densest, saturated part: inside bright surroundings
    img[10:40, 10:35] = 0.15                        # the marker's box
    img[14:36, 14:18] = 1.0                         # 'L': upright stroke
    img[32:36, 14:30] = 1.0                         # 'L': foot
    return img


def test_marker_is_masked_and_bone_is_left_alone() -> None:
    img = radiograph_with_marker()
    out = mask_burned_in_labels(img)
    assert out[14:36, 14:18].max() < 0.5            # the letter is gone
    assert np.array_equal(out[100:108, 80:88], img[100:108, 80:88])  # the bright bone is untouched
    assert np.array_equal(out[40:190, 50:120], img[40:190, 50:120])


def test_a_detector_sized_image_loses_its_label_and_keeps_its_bone() -> None:
    """Over MASK_WORKING_SIDE the labels are found on a block-averaged copy: a 2400 px radiograph (the marker image
    scaled up 12 times) loses its letter and keeps its bone."""
    from models.data.preprocess import MASK_WORKING_SIDE

    small = radiograph_with_marker()
    big = np.kron(small, np.ones((12, 12), dtype=np.float32))
    assert max(big.shape) > 2 * MASK_WORKING_SIDE
    out = mask_burned_in_labels(big)
    assert out[14 * 12:36 * 12, 14 * 12:18 * 12].max() < 0.5          # the letter is gone
    assert np.array_equal(out[40 * 12:190 * 12, 50 * 12:120 * 12], big[40 * 12:190 * 12, 50 * 12:120 * 12])


def test_image_without_markers_is_unchanged() -> None:
    img = radiograph_with_marker()
    img[10:40, 10:35] = 0.08
    assert np.array_equal(mask_burned_in_labels(img), img)


def test_geometry_pad_keeps_aspect_and_stretch_fills() -> None:
    img = np.ones((200, 100), dtype=np.float32)
    padded = to_model_input([img], Geometry(size=64, aspect="pad"))
    stretched = to_model_input([img], Geometry(size=64, aspect="stretch"))
    assert padded.shape == stretched.shape == (1, 3, 64, 64)
    # padding: the left and right quarters are black (normalised black is negative), the middle is white
    assert padded[0, 0, 32, 2] < 0 < padded[0, 0, 32, 32]
    assert stretched[0, 0, 32, 2] > 0


# --------------------------------------------------------------------------- crop to the body part
def _hand_on_detector(height: int = 400, width: int = 300) -> np.ndarray:
    """A bright 'hand' (soft tissue with denser 'bones') on a dark detector field, a burned-in marker apart."""
    rng = np.random.default_rng(3)
    image = rng.normal(0.08, 0.01, (height, width)).astype(np.float32)
    image[120:380, 60:210] = 0.45                       # soft tissue
    image[150:370, 90:110] = image[150:370, 150:170] = 0.8  # bones
    image[20:40, 250:265] = 1.0                          # an "L" marker, small and separate
    return image.clip(0, 1)


def test_body_box_finds_the_part_and_leaves_the_marker_out() -> None:
    from models.data.preprocess import body_box

    top, left, bottom, right = body_box(_hand_on_detector())
    assert 100 <= top <= 120 and 40 <= left <= 60 and 380 <= bottom <= 400 and 210 <= right <= 230
    assert top > 40  # the marker at rows 20-40 is not in the box


def test_body_box_keeps_the_whole_image_when_nothing_stands_out() -> None:
    from models.data.preprocess import body_box

    assert body_box(np.full((100, 80), 0.5, dtype=np.float32)) == (0, 0, 100, 80)
    assert body_box(np.zeros((10, 10), dtype=np.float32)) == (0, 0, 10, 10)


def test_crop_makes_loose_and_tight_framing_agree() -> None:
    from models.data.preprocess import Geometry, to_unit_square

    loose = _hand_on_detector()
    tight = loose[100:400, 40:230].copy()  # cropped to the hand, as a PACS user might
    padded = np.pad(loose, ((200, 200), (200, 200)), constant_values=0.08)  # zoomed out
    geometry = Geometry(size=64, aspect="pad", crop_to_body=True)
    reference = to_unit_square(loose, geometry)
    for variant in (tight, padded):
        assert float((to_unit_square(variant, geometry) - reference).abs().mean()) < 0.03
    plain = Geometry(size=64, aspect="pad")
    assert float((to_unit_square(padded, plain) - to_unit_square(loose, plain)).abs().mean()) > 0.05


def test_heatmap_goes_back_into_the_crop_box() -> None:
    from models.nets.cam import to_image
    from models.data.preprocess import Geometry, body_box

    image = _hand_on_detector()
    geometry = Geometry(size=32, aspect="pad", crop_to_body=True)
    heatmap = to_image(np.ones((32, 32), dtype=np.float32), image, geometry)
    top, left, bottom, right = body_box(image)
    assert heatmap.shape == image.shape
    assert heatmap[:top].max() == 0 and heatmap[:, right:].max() == 0
    assert heatmap[top + 20:bottom - 20, left + 20:right - 20].min() > 0.5


# --------------------------------------------------------------------------- framing variants
def test_framing_variants_reframe_the_same_hand() -> None:
    from models.data.framing import VARIANTS, make_variant

    image = _hand_on_detector()
    for name in VARIANTS:
        out = make_variant(image, name)
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1, name
    tight = make_variant(image, "tight_crop_black")
    assert tight.shape[0] < image.shape[0] and tight.shape[1] < image.shape[1]
    assert tight[0, 0] == 0  # the background outside the silhouette is black
    assert make_variant(image, "zoomed_out").shape == image.shape
    assert make_variant(image, "rotated_plus_15").shape[1] > image.shape[1]  # the canvas grows to keep the corners
    # MONOCHROME1 written and decoded by the daemon comes back as the same picture, bone bright.
    back = make_variant(image, "monochrome1_dicom")
    assert back.shape == image.shape and float(np.abs(back - image).mean()) < 0.02
    np.testing.assert_array_equal(make_variant(image, "right_hand_stated"), image[:, ::-1])
    with pytest.raises(ValueError, match="unknown framing variant"):
        make_variant(image, "upside_down")
