"""The shared preprocessing path: geometry and burned-in label masking."""

from __future__ import annotations

import numpy as np

from models.preprocess import Geometry, mask_burned_in_labels, to_model_input


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
