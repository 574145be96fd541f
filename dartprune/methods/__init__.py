"""Pruning methods, one file each, found through a registry by name (`DartConfig(method=...)`)."""
from dartprune.methods import dart, dense, griffin, random_mask, static, threshold, wanda_static  # noqa: F401
from dartprune.methods.base import METHODS, Method, get_method, register_method

__all__ = ["METHODS", "Method", "get_method", "register_method"]
