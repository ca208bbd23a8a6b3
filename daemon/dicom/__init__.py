"""DICOM reading shared by the stages: pixel data to a display image, header values, anatomy from the tags,
derived UIDs, DICOM TLS.

Used by analyse (decode, header values, anatomy from tags), config (route anatomy names checked against the same
vocabulary), output (the SC's picture, copied header values, result UIDs), receive and dispatch (TLS contexts).
Nothing here knows about studies, routes or the data directory.
"""
