"""From files on disk to few-shot `Episode`s: scanning, splits, samplers, transforms, datamodules.

This package may import `imaging_meta.episode` and nothing else from `imaging_meta`.
"""
