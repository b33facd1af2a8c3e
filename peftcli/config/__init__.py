"""The recipe: its dataclasses, strict validation and `key=value` overrides (`recipe`)."""
