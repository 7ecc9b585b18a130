"""The one home of MONAI transforms and augmentation: volumes, slices, items, self-supervised views, superpixels."""
