"""Pure forward/backward kernel pairs written once against the array namespace of their inputs.

Dimension legend used in shape comments throughout:
    B  micro-batch size      T  sequence length     C  model width (d_model)
    H  attention heads       D  head width (C // H)  V  vocabulary size
    N  rows after flattening leading dimensions (B * T)
Each kernel `*_forward(...)` returns `(out, cache)`; `*_backward_input(dout, cache, ...)` returns
the input gradient; `*_backward_weight(dout, cache, grads...)` ACCUMULATES into the given gradient
buffers, so weight gradients can be deferred (zero-bubble schedules) and summed over micro-batches.
"""
