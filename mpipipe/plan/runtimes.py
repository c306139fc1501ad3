"""What a training runtime does per transformer block that the cost model prices: its elementwise
memory traffic, its gradient accumulation and the width of its data-parallel gradients.

Layout.runtime names one: "mpipipe" (this project's kernels, what `plan` and `plan --validate`
predict) or "megatron" (Megatron-LM as NVIDIA ran it for the SC21 paper, what
`plan --reproduce megatron-sc21` predicts). The pipeline message of each is in cost.py
(pipeline_message).

Elementwise traffic counts the elements a block's kernels outside the matrix products read and
write per micro-batch, in units of b x T x C (whole: every tensor-parallel rank moves them, or
1/t of them with sequence parallelism; split: 1/t of them) and of b x H x T^2 / t (the
attention scores). Dropout's traffic is GPT.dropout's, the same for both.

Megatron-LM's block of 2021 (NVIDIA/Megatron-LM megatron/model/transformer.py,
ParallelTransformerLayer; fused kernels in megatron/model/fused_softmax.py,
fused_bias_gelu.py, fused_layer_norm.py), read kernel by kernel:
  F whole 10: two apex LayerNorms (read, write: 2 each), two bias_dropout_add_fused (read the
      branch, the residual, write: 3 each; ASSUMPTION: one kernel each, as the TorchScript
      function is meant to fuse; unfused it moves 8);
  F split 16: the QKV projection's bias, added after the product (PyTorch's F.linear on a 3-D
      input: matmul, then add_: 6 for 3C), the context's permute().contiguous() (2), the fused
      bias-GeLU of the 4C hidden layer (read, write: 8); the other two biases ride in
      bias_dropout_add (skip_bias_add);
  F scores 2: scaled_upper_triang_masked_softmax, one fused kernel (read scores, write
      probabilities; taken for T = 2048: 16 < sk <= 2048, b x heads % 4 == 0);
  B whole 22: two LayerNorm backwards (read dy, x; write dx: 3, and the gamma/beta pass reads
      dy, x again: 2), two bias_dropout_add backwards (read dy, write dx, the bias's sum reads
      dx: 3 each), the two residual forks' gradient sums (read 2, write 1: 3 each);
  B split 27: bias-GeLU backward (read dy, x, write dx: 12) and its bias's sum (4), the QKV
      bias's sum (3), the permute's backward (2), and the q, k, v gradients joined into the
      QKV output's (torch.split's backward concatenates: read 3, write 3);
  B scores 3: the fused softmax backward (read dy and the probabilities, write dx).
mpipipe's block (mpipipe/kernels/, unfused): F 10 whole, 24 split, 4 scores; B twice F.

The loss on the vocabulary-parallel logits (b x T x V / t of them), in 16-bit elements: mpipipe
moves 4 in F and 4 in B. Megatron (megatron/model/gpt_model.py: without --fp16-lm-cross-entropy
the fp16 logits go through .float(); megatron/mpu/cross_entropy.py, vocab_parallel_cross_entropy)
moves, in bytes per logit, F: the cast (read 2, write 4), the maximum (read 4), sub_ (8),
exp (8), the sum (read 4), div_ (8): 38 = 19 elements; B: mul_ by the loss's gradient (8), the
cast back to fp16 (read 4, write 2): 14 = 7 elements.

Gradient accumulation, in elements moved per parameter and micro-batch beyond the weight-gradient
product: mpipipe's is priced with the products (0). Megatron's local DDP (--DDP-impl local, the
SC21 rows with pp > 1) keeps a contiguous gradient buffer, main_grad, and a hook adds each
micro-batch's fresh 16-bit gradient into it, main_grad.add_(grad): read 2, write 1 (NVIDIA/
Megatron-LM megatron/model/distributed.py, DistributedDataParallel._make_param_hook;
ASSUMPTION: the SC21 runs do not use --gradient-accumulation-fusion, which folds the add into
the product: neither the paper nor its artifact's flags name it). PyTorch's DDP (the pp = 1
rows) accumulates into .grad from the second micro-batch on: (m - 1) / m of that, on average.

Gradient width in the data-parallel reduction, bytes per element for 16-bit training: mpipipe
reduces float32 copies (4); Megatron's buffer is the parameters' dtype unless
--accumulate-allreduce-grads-in-fp32 (megatron/model/distributed.py, _get_buffer_type; the flag
defaults off and is forced on for bf16 only): 2 for the SC21 runs (fp16; ASSUMPTION: the
artifact's CONFIG.sh, not public, does not set it). PyTorch's DDP reduces the fp16 .grad: 2.

When a layer's gradients are final: mpipipe's W is its own action, so during the last W;
Megatron's backward is one autograd pass per chunk (recomputation, input and weight gradients
layer by layer), so during the last B and W together (what PyTorch's DDP overlaps with).

The mixed-precision Adam step, bytes per parameter: mpipipe's reads and writes the fp32 master,
its two moments and the gradient (7 x 4) and writes the 16-bit copy (4, with its read).
Megatron's (megatron/optimizer/optimizer.py, Float16OptimizerWithFloat16Params.step): the fp16
main_grad to an fp32 .grad (read 2, write 4), unscale and check for inf
(_amp_foreach_non_finite_check_and_unscale_: 8), the norm for clipping (read 4), apex's
FusedAdam (read parameter, gradient and moments, write parameter and moments: 28), the fp32
masters to the fp16 model (read 4, write 2), the gradient buffer zeroed (write 2): 54.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpipipe.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    name: str
    whole_f: float  # elementwise elements per block, units of bTC (see above)
    split_f: float  # units of bTC / t
    scores_f: float  # units of bHT^2 / t
    whole_b: float
    split_b: float
    scores_b: float
    accumulate: float  # elements moved per parameter and micro-batch by W's accumulation
    grad_width_16: int  # bytes per gradient element reduced over dp, for 16-bit training
    blocking_p2p: bool  # the pipeline exchange: Megatron's scatter/gather, blocking
    fused_backward: bool  # B and W are one pass (autograd): gradients final during both
    optimizer_16: int  # bytes moved per parameter by the 16-bit (mixed-precision) Adam step
    logits_f: float  # the loss's elementwise traffic, units of b x T x V / t 16-bit elements
    logits_b: float
    tied_embeddings: bool  # the first and last stages all-reduce the word embeddings' gradient


RUNTIMES = {
    "mpipipe": Runtime("mpipipe", 10, 24, 4, 20, 48, 8, 0, 4, False, False, 32, 4, 4, False),
    "megatron": Runtime("megatron", 10, 16, 2, 22, 27, 3, 3, 2, True, True, 54, 19, 7, True),
}


def runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ConfigError(
            f"runtime {name!r} is not one the planner prices (choose {', '.join(RUNTIMES)})"
        )
    return RUNTIMES[name]
