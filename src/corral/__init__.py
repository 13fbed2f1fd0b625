"""corral: run services on a pool of machines, and find and configure them."""

__version__ = "0.1.0"
