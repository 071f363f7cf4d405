"""One-off preprocessing: raw images -> PNG dataset -> VAE latents -> cached encoder features.

Run as ``python preprocessing/dataset_tools.py {convert,encode,cache-features} ...`` from the
repository root; see preprocessing/README.md for the on-disk layout.
"""
