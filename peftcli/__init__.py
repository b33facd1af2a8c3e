"""peftcli: parameter-efficient fine-tuning of Hugging Face transformers from YAML recipes."""

__version__ = "0.1.0"
