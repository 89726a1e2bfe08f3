"""palikit: the self-hosted toolkit for Google's PaliGemma and PaliGemma 2."""

__version__ = "0.1.0"
