"""Hugging Face interoperability: diffmoe models to and from transformers' native classes."""
