"""cofi: fused kernels and the complete CoFi structured-pruning system (Xia, Zhong, Chen, ACL 2022)."""
__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (registers torch.ops.cofi.*)
