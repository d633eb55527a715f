"""Evaluation, after a round: the Frechet distance of a model's samples (fid.py) on the features of a pinned
network (extractors.py, inception.py), and sample grids as PNG files (images.py)."""
