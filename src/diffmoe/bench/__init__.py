"""Benchmarks behind ``diffmoe bench``: each writes a markdown table and JSON under a results folder.

    layers   forward+backward time and memory of every MoE layer as ratios to the dense FFN
"""
