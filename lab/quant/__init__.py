"""QLoRA's frozen 4-bit base (Dettmers et al. 2023), written from scratch.

A frozen weight W (out, in) is flattened and cut into blocks of `block_size` numbers (64 in the
paper). Each block keeps one scale, its absolute maximum, and every number becomes a 4-bit code:
the index of the nearest of 16 levels in [-1, 1] after dividing by the block's absmax.

    W -> blocks (n_blocks, 64) -> w / absmax -> nearest level -> code 0..15 -> two codes a byte

Three 16-level tables (the "data types" of the paper's section 3):
  - int4: evenly spaced levels k/7 (absmax int4),
  - fp4:  a tiny float with 2 exponent bits and 1 mantissa bit (bitsandbytes' e2m1),
  - nf4:  NormalFloat, levels at quantiles of N(0, 1), so that normally distributed weights use
          every level equally often (section 3, "4-bit NormalFloat Quantization").

Double quantisation (section 3, "Double Quantization") stores the fp32 absmax of every block in
8 bits too, one fp32 scale per 256 of them: 32/64 = 0.5 bits per weight become
8/64 + 32/(64*256) = 0.127, so a weight costs 4.127 bits instead of 4.5.

`Linear4bit` holds the packed codes as buffers and dequantises on the fly in forward and again in
backward, so no dense copy of W stays alive between the two. `quantize_base` swaps a model's
frozen linears for them; LoRA then trains on top.

formats holds the three tables, blockwise the codes and their packing, linear4bit the layer,
model_4bit what is done to a whole model.
"""

from .blockwise import (
    dequantize_blockwise,
    dequantize_scales,
    pack_4bit,
    quantize_blockwise,
    quantize_scales,
    unpack_4bit,
)
from .formats import (
    DQ_BLOCK_SIZE,
    FP4_LEVELS,
    INT4_LEVELS,
    MAX_BLOCK_SIZE,
    NF4_LEVELS,
    SCHEMES,
    build_fp4_levels,
    build_nf4_levels,
    levels,
)
from .linear4bit import Linear4bit, dense_linear  # noqa: F401 (dense_linear: lab.merging, lab.spectra)
from .model_4bit import dequantize_base, quantization_error, quantize_base

__all__ = [
    "DQ_BLOCK_SIZE",
    "FP4_LEVELS",
    "INT4_LEVELS",
    "MAX_BLOCK_SIZE",
    "NF4_LEVELS",
    "SCHEMES",
    "Linear4bit",
    "build_fp4_levels",
    "build_nf4_levels",
    "dequantize_base",
    "dequantize_blockwise",
    "dequantize_scales",
    "levels",
    "pack_4bit",
    "quantization_error",
    "quantize_base",
    "quantize_blockwise",
    "quantize_scales",
    "unpack_4bit",
]
