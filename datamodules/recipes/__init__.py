"""Recipes for public benchmarks: turn a downloaded dataset into a folder this project's scanner indexes.

`datamodules.recipes.prepare` (``imaging-meta prepare``, or ``python -m datamodules.recipes.prepare``) converts
SSL-ALPNet's two few-shot abdominal benchmarks, Synapse/BTCV multi-organ CT (``synapse``) and CHAOS T2-SPIR MR
(``chaos_mr``), into a Decathlon-style folder with named labels and SSL-ALPNet's 5-fold split; its public names
are ``prepare``, ``PrepareError``, ``DATASETS``, ``ORGANS``, ``add_arguments``, ``run`` and ``main``.
`datamodules.recipes.medmnist` (``imaging-meta prepare medmnist``) checks downloaded MedMNIST 2D ``.npz`` files
against the published MD5s (`datamodules.recipes.medmnist_files`) and writes fixed cross-domain few-shot test
episodes and a data config for them. Nothing is imported here, so that ``python -m datamodules.recipes.prepare`` runs the module once. See docs/recipes.md.
"""
