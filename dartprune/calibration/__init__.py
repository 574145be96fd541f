"""Calibration of the two calibrated baselines: the file format (`file`, which the methods read) and the
collection of its statistics from the dense model (`collect`, which `dartprune calibrate` runs)."""
