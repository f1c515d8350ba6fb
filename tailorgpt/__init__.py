"""tailorgpt: from a folder of your own text to a fine-tuned GPT-2 served in production."""

__version__ = "0.1.0"
