"""Placeholder: the model helper replaces this file."""
