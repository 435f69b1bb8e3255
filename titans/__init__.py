"""titans: Titans (Behrouz, Zhong, Mirrokni 2025) in PyTorch: the neural long-term memory and MAC/MAG/MAL/LMM."""

__version__ = "0.1.0"
