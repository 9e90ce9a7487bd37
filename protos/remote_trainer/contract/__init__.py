"""The contract between server and SDK: the generated trainer.v1 messages (``trainer.v1``), the one
tensor codec (``codec``) and the shared names (``names``).

Both sides import this package; it imports neither of them, and nothing here needs torch.
"""
