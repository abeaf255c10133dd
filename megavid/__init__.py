"""megavid: video-language training at scale."""

__version__ = "0.1.0"
