"""Image data as integer levels, with no model code and no training framework."""

from glowlab.data.arrays import DIGITS_N_BINS, ImageArrays, load_digits_images, load_npz_images, split_indices

__all__ = ["DIGITS_N_BINS", "ImageArrays", "load_digits_images", "load_npz_images", "split_indices"]
