"""titans: Titans (Behrouz, Zhong, Mirrokni 2025) in PyTorch — neural long-term memory and the MAC/MAG/MAL/LMM models."""

__version__ = "0.1.0"
