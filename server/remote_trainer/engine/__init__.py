"""The torch work of the training service, free of any transport: it imports neither grpc nor the
generated code, takes and returns tensors and small dataclasses, and raises the typed errors of
``errors``.

Import each module by name (``from remote_trainer.engine.session import SessionEngine``): this
package itself imports nothing, so the light ones (``limits``, ``errors``) load without torch.

- ``session``: ``SessionEngine``, one model with its optimizer, gradients and pending forward
- ``pending``: ``Pending``, the pending forward (its logits, or why Backward cannot use it), and
  running a forward that can be taken back
- ``device``: ``Placement`` (a session's device, autocast, memory format, pinned memory) and the
  out-of-memory handling
- ``inputs``: the input batches Forward and TrainStep accept
- ``losses``: labels and output gradients, the losses, backpropagating from logits
- ``snapshots``: what the gradient and parameter streams copy out under the session's lock
- ``state``: ``SessionState``, the typed state a checkpoint holds
- ``models``: building resnet18 (random, from a file, ImageNet from the hub cache), devices, freezing
- ``optimizer``: ``OptimizerSpec``, the optimizer as validated plain data
- ``results``: the dataclasses the engine returns
- ``limits``: the sizes a session accepts
- ``tensors``: statistics, generated inputs, input checks
- ``patterns``: choosing parameters by glob or module prefix
- ``graph``: walking the autograd graph of a forward
- ``checkpoints``: checkpoint files, written atomically, read without unpickling code
- ``memory``: giving freed memory back to the operating system
- ``budget``: the memory budget: a call's size estimated from shapes, refused before allocating
- ``portable``: tensors as numpy arrays and dtype names, to cross a process boundary (Ray)
- ``protocol``: ``Engine``, the methods the servicer calls on a session, whoever holds it
- ``errors``: the typed domain errors
"""
