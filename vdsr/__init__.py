"""VDSR super-resolution: MATLAB-exact conventions, data pipeline, models, training, evaluation."""
