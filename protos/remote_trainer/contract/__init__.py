"""The contract between server and SDK: the generated trainer.v1 messages (``trainer.v1``), the one
tensor codec (``codec``), tensor streams in chunks (``chunking``), the wire bytes written and read by
hand (``wire``) and the shared names (``names``).

Both sides import this package; it imports neither of them, and nothing here needs torch.
"""
