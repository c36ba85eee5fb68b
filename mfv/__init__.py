"""Multifaceted Feature Visualization (Nguyen, Yosinski, Clune 2016) in PyTorch."""
