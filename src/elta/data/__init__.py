"""Datasets as they are distributed: readers, image loading, checks, demo data."""

from elta.data.check import CheckReport, check_dataset, check_images
from elta.data.images import list_images, load_image, resolve_image_path
from elta.data.readers import AnnotationError, CsvColumns, detect_format, read_annotations
from elta.errors import ImageLoadError

__all__ = [
    "AnnotationError",
    "CheckReport",
    "CsvColumns",
    "ImageLoadError",
    "check_dataset",
    "check_images",
    "detect_format",
    "list_images",
    "load_image",
    "read_annotations",
    "resolve_image_path",
]
