"""graftlm: continual pre-training of language models that measures what is gained and what is lost."""

__version__ = "0.1.0"
