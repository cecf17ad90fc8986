"""down_proj_residual: hidden[t, rows] += down[layer, rows] @ mlp_act[t]."""
from .residual_matvec import residual_matvec

DOWN_PROJ_RESIDUAL = residual_matvec("down_proj_residual", 7, "down", "mlp_act",
                                     lambda cfg: cfg.intermediate_size, __doc__)
