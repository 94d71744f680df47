"""iterlayers: deep networks whose layers are iterative algorithms."""
__version__ = "0.1.0"
