"""Datasets: the dataset spec, image preparation and physical-space augmentation."""
