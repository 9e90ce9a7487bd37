"""Side-by-side benchmarks of the training service: remote vs local PyTorch, ours vs the raw gRPC floor.

``python -m bench`` prints the table; ``python -m bench --help`` lists the sections and sizes.
"""
