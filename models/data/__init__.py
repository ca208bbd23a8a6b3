"""Data: files on disk become images and labelled cases.

Enters: dataset folders (RSNA bone age, MURA, FracAtlas, class folders), region labels, image files (PNG, JPEG,
DICOM through :mod:`models.display_image`). Leaves: cases with a deterministic id-hash split
(:mod:`~models.data.datasets`, :mod:`~models.data.fracatlas`, :mod:`~models.data.region_labels`), float32 images in
[0, 1] and the :class:`~models.data.preprocess.Geometry` that turns one into a model input
(:mod:`~models.data.preprocess`), the same image as other sites process it (:mod:`~models.data.site_processing`) or
frame it (:mod:`~models.data.framing`). No torch network here; imports only :mod:`models.display_image` from outside.
"""
