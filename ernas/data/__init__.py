"""Data shared by every task: the real photographs bundled with installed packages and image
reading from user folders (task-specific datasets live in ``ernas.tasks``)."""

from ernas.data.images import (
    BUNDLED_SPLITS,
    IMAGE_EXTENSIONS,
    bundled_images,
    bundled_names,
    load_bundled,
    read_image,
)

__all__ = ["BUNDLED_SPLITS", "IMAGE_EXTENSIONS", "bundled_images", "bundled_names",
           "load_bundled", "read_image"]
