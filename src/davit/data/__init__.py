"""data layer: classification datasets (ImageFolder/ImageNet, Hugging Face datasets, webdataset shards, digits),
transforms, batch mixing, image reading."""

from __future__ import annotations

from .classification import (
    DigitsDataset,
    ImageFolderDataset,
    Mixer,
    build_classification_datasets,
    build_mixup,
    digits_split,
    scan_image_folder,
    skipped_images,
)
from .config import IMAGENET_MEAN, IMAGENET_STD, ClsDataConfig
from .image import IMAGE_EXTENSIONS, ImageReadError, is_image_file, load_rgb, to_rgb
from .imagenet import imagenet_class_names
from .sources import HFImageDataset, WebDatasetShards
from .transforms import build_eval_transform, build_train_transform, eval_transform_from_config

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ClsDataConfig",
    "DigitsDataset",
    "HFImageDataset",
    "ImageFolderDataset",
    "ImageReadError",
    "Mixer",
    "WebDatasetShards",
    "build_classification_datasets",
    "build_eval_transform",
    "build_mixup",
    "build_train_transform",
    "digits_split",
    "eval_transform_from_config",
    "imagenet_class_names",
    "is_image_file",
    "load_rgb",
    "scan_image_folder",
    "skipped_images",
    "to_rgb",
]
