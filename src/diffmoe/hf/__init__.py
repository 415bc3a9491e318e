"""Models that leave diffmoe: export to and import from Hugging Face transformers (native classes or
custom code), and evaluation with lm-eval."""
