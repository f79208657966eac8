"""Quantization formats, algorithms and torch reference modules."""
