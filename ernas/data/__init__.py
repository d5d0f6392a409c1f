"""Data: bundled real images, user image folders, Gaussian noise model and torch Datasets."""

from ernas.data.datasets import (
    NoisyImageDataset,
    PairedImageDataset,
    SigmaSpec,
    add_gaussian_noise,
    bundled_denoise_datasets,
    clean_folder,
    paired_folders,
    test_noise,
)
from ernas.data.images import (
    BUNDLED_SPLITS,
    IMAGE_EXTENSIONS,
    bundled_images,
    bundled_names,
    load_bundled,
    read_image,
)

__all__ = [
    "BUNDLED_SPLITS", "IMAGE_EXTENSIONS", "NoisyImageDataset", "PairedImageDataset", "SigmaSpec",
    "add_gaussian_noise", "bundled_denoise_datasets", "bundled_images", "bundled_names",
    "clean_folder", "load_bundled", "paired_folders", "read_image", "test_noise",
]
