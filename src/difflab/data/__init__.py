"""Data sets as uint8 tensors, offline sources first, and the batch transforms the runner applies."""

from difflab.data.datasets import (caption_options, caption_table, class_names, dataset_classes, default_prompts,
                                   load_split, load_splits, text_vocabulary)
from difflab.data.image_data import ImageData
from difflab.data.transforms import augment_batch, to_model_range, to_uint8

__all__ = ["ImageData", "augment_batch", "caption_options", "caption_table", "default_prompts", "class_names", "dataset_classes", "load_split", "load_splits", "text_vocabulary", "to_model_range", "to_uint8"]
