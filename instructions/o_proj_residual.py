"""o_proj_residual: hidden[t, rows] += o_proj[layer, rows] @ attn_out[t].

Each block owns disjoint rows of the residual stream, so the update is in place.
"""
from .residual_matvec import residual_matvec

O_PROJ_RESIDUAL = residual_matvec("o_proj_residual", 5, "o_proj", "attn_out",
                                  lambda cfg: cfg.q_size, __doc__)
