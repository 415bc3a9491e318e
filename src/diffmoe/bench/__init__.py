"""Benchmarks behind ``diffmoe bench``: each writes a markdown table and JSON under a results folder.

layers     forward+backward time and memory of every MoE layer as ratios to the dense FFN, and sweeps
model      training tokens/s of configs, eager and under torch.compile, with FLOP utilisation
generate   prefill and per-token decoding time with the KV cache, as ratios to the dense model
"""
