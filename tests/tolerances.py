"""One tolerance table for every numerical comparison, keyed by the compute dtype."""
import torch

# Relative error ||out - ref|| / ||ref|| allowed against a float32/float64 reference.
RELATIVE_TOLERANCE = {
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}


# Whole-model logits against a float32 reference: the error of every layer compounds, and
# a bf16 model also prefills through bf16 matmuls and keeps its KV cache in bf16.
MODEL_RELATIVE_TOLERANCE = {
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 3e-2,
}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
