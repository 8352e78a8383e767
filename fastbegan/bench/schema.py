"""What a results file holds: its schema name, the variants, the workloads and the row keys."""
from __future__ import annotations

SCHEMA = "fastbegan-bench/1"

VARIANTS = {
    "p": "the popular PyTorch port's step structure (D applied 3 times, one backward of L_D + L_G), "
         "fp32 eager NCHW (benchmarks/port_step.py)",
    "a": "fp32 eager reference step (NCHW, torch backend, PyTorch defaults)",
    "b": "bf16 autocast + channels_last eager reference step (torch backend, cudnn.benchmark)",
    "c": "torch.compile of (b)",
    "d": "fastbegan's default step for a long run (GPU: triton backend, fused step, CUDA graph, "
         "torch.compile; CPU: bf16 where the CPU has it, fused step, torch.compile, tuned allocator)",
    "e": "fastbegan's step without torch.compile (what --compile auto runs for a short run)",
}

WORKLOADS = {
    "matmul_peak": "bf16 matmul (measured achievable peak)",
    "train_step": "full training step (Trainer.train_step)",
    "D_fwd_bwd": "D forward + backward (L1 loss, grads of D's parameters)",
    "G_fwd": "G forward (inference)",
    "conv_elu": "conv3x3 + ELU forward (d: fused; a-c: conv + separate ELU)",
    "up_conv_elu": "nearest upsample x2 + conv3x3 + ELU forward (d: fused)",
    "l1_loss": "L1 reconstruction loss mean|x - r| forward",
}

# keys every row has; finalize_rows adds the speedups (SPEEDUP_KEYS) and the % of peak
SPEEDUP_KEYS = ("speedup_vs_p", "speedup_vs_a", "speedup_vs_best_bc")
# world / allreduce_ms: under torchrun, the processes and each step's host time in its all-reduce
ROW_KEYS = ("workload", "variant", "case", "status", "reason", "what", "params", "ms_median", "ms_q1",
            "ms_q3", "ms_iqr", "ms_min", "rounds", "inner", "first_call_s", "images", "images_per_s",
            "flops", "tflops", "bytes", "gbps", "peak_mem_mb", "world", "allreduce_ms")
