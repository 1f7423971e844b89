"""The evaluate stage: standard SR benchmark protocol, tiled inference, reports, `upscale`.

Importing this package is cheap (no torch/mlflow): modules that need torch import it themselves.
"""
