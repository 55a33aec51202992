"""mist-kit: deploy separated-tuning (MIST) vision models to small devices.

Importing `mist_kit` is light and torch-free: heavy modules (backbone, training, export) load only when used.
"""

__version__ = "0.1.0"
