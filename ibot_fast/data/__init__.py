"""Data: multi-crop augmentation, ImageFolder + masks, loaders, and the offline MNIST demo data."""

from ibot_fast.data.dataset import (
    IMG_EXTENSIONS,
    ImageFolderMask,
    SyntheticImageDataset,
    collate_multicrop,
    list_image_folder,
)
from ibot_fast.data.demo import default_demo_root, prepare_mnist_folder
from ibot_fast.data.loader import (
    EvalTransform,
    ImageFolderEval,
    build_eval_transform,
    build_pretrain_loader,
    seed_worker,
)
from ibot_fast.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitter,
    MultiCropAugmentation,
    random_resized_crop_params,
    to_tensor_normalize,
)

__all__ = [
    "IMG_EXTENSIONS", "ImageFolderMask", "SyntheticImageDataset", "collate_multicrop",
    "list_image_folder", "default_demo_root", "prepare_mnist_folder", "EvalTransform",
    "ImageFolderEval", "build_eval_transform", "build_pretrain_loader", "seed_worker",
    "IMAGENET_MEAN", "IMAGENET_STD", "ColorJitter", "MultiCropAugmentation",
    "random_resized_crop_params", "to_tensor_normalize",
]
