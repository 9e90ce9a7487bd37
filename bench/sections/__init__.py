"""One module per section of ``python -m bench``; each has ``run(ctx) -> list[Row]`` and the
harness (bench/harness.py) holds their order and names."""
