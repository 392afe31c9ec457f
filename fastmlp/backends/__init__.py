"""The implementations of one instrumented dense pass, each in one module.

- :mod:`~fastmlp.backends.reference`: plain PyTorch, float64 statistics, any device; what
  the others are tested against.
- :mod:`~fastmlp.backends.cpu`: the same numbers, fast on the CPU.
- :mod:`~fastmlp.backends.fused`: the Triton kernels' host side (CUDA, or the CPU under
  ``TRITON_INTERPRET=1``); the kernels themselves are :mod:`fastmlp.kernels`.

Each exposes ``forward(x, weight, bias, activation, bufs, settings) -> (h, z)`` and
``backward(dh, x, weight, saved, activation, bufs, settings, need_x, need_w, need_b) ->
(dx, dW, db)``; :func:`fastmlp.op.route` picks one per pass.
"""
