"""Hand-written forward/VJP pairs, NumPy/CuPy-generic, channels last (NHWC).

Every ``*_fwd`` returns ``(y, res)``; the matching ``*_bwd(res, dy)`` returns the cotangents.
``reference`` (slow loops) and ``gradcheck`` are for tests and are not re-exported.
"""

from ssmpi.nn.ops.conv import conv2d_bwd, conv2d_fwd, conv3d_causal_bwd, conv3d_causal_fwd
from ssmpi.nn.ops.fuse import fuse_bwd, fuse_fwd, tau_bwd, tau_fwd, tau_out_shape
from ssmpi.nn.ops.init import glorot_uniform, he_normal
from ssmpi.nn.ops.linear import linear_bwd, linear_fwd
from ssmpi.nn.ops.losses import mse_bwd, mse_fwd, softmax_xent_bwd, softmax_xent_fwd
from ssmpi.nn.ops.nonlin import dropout_bwd, dropout_fwd, relu_bwd, relu_fwd
from ssmpi.nn.ops.pool import (
    avgpool2d_bwd,
    avgpool2d_fwd,
    global_avgpool_bwd,
    global_avgpool_fwd,
    maxpool2d_bwd,
    maxpool2d_fwd,
)
from ssmpi.nn.ops.reshape import space_to_depth_bwd, space_to_depth_fwd

__all__ = [
    "conv2d_fwd", "conv2d_bwd", "conv3d_causal_fwd", "conv3d_causal_bwd",
    "maxpool2d_fwd", "maxpool2d_bwd", "avgpool2d_fwd", "avgpool2d_bwd",
    "global_avgpool_fwd", "global_avgpool_bwd",
    "relu_fwd", "relu_bwd", "dropout_fwd", "dropout_bwd",
    "linear_fwd", "linear_bwd",
    "space_to_depth_fwd", "space_to_depth_bwd",
    "softmax_xent_fwd", "softmax_xent_bwd", "mse_fwd", "mse_bwd",
    "fuse_fwd", "fuse_bwd", "tau_fwd", "tau_bwd", "tau_out_shape",
    "he_normal", "glorot_uniform",
]
