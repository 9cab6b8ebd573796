"""Datasets as they are distributed: formats, annotations, image loading, checks, demo data."""

from elta.data.annotations import Annotations, DatasetInfo, read_annotations
from elta.data.check import CheckReport, check_dataset, check_images
from elta.data.formats import FORMATS, CsvColumns, Format, detect_format, register_format
from elta.data.images import list_images, load_image, resolve_image_path
from elta.errors import AnnotationError, ImageLoadError

__all__ = [
    "FORMATS",
    "AnnotationError",
    "Annotations",
    "CheckReport",
    "CsvColumns",
    "DatasetInfo",
    "Format",
    "ImageLoadError",
    "check_dataset",
    "check_images",
    "detect_format",
    "list_images",
    "load_image",
    "read_annotations",
    "register_format",
    "resolve_image_path",
]
