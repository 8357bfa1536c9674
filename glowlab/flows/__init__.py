"""Flow layers in pure torch (and torchdiffeq for continuous flows).

Every layer maps data towards the latent space with ``forward(x) -> (y, logdet)``, ``logdet`` of
shape ``(B,)``, back with ``inverse(y) -> x``, and samples with ``inverse_with_logdet(y) -> (x,
logdet)``. Image layers act on (B, C, H, W), vector layers on (B, D).
"""

from glowlab.flows.actnorm import ActNorm
from glowlab.flows.autoregressive import IAF, MAF
from glowlab.flows.base import Flow, FlowSequence, standard_normal_log_prob, sum_except_batch
from glowlab.flows.continuous import CNF
from glowlab.flows.conv1x1 import InvConv1x1, InvConv1x1LU
from glowlab.flows.coupling import COUPLINGS, AdditiveCoupling, AffineCoupling, CheckerboardCoupling, make_coupling
from glowlab.flows.elementwise import ElementwiseAffine, ElementwiseSpline, LeakyReLU, PiecewiseLinear
from glowlab.flows.linear import LULinear
from glowlab.flows.made import MADE
from glowlab.flows.nn import ZeroConv2d
from glowlab.flows.permutations import PERMUTATIONS, ChannelPermutation, Reverse, Shuffle, make_permutation
from glowlab.flows.planar import Planar, Radial
from glowlab.flows.priors import Split, TopPrior
from glowlab.flows.residual import AdditiveResidual, InvertibleResidual
from glowlab.flows.splines import piecewise_linear, rational_quadratic_spline
from glowlab.flows.squeeze import Squeeze
from glowlab.flows.standardize import Standardize
from glowlab.flows.trace import hutchinson_trace
from glowlab.flows.vector_coupling import VectorCoupling

__all__ = [
    "CNF",
    "COUPLINGS",
    "IAF",
    "MADE",
    "MAF",
    "PERMUTATIONS",
    "ActNorm",
    "AdditiveCoupling",
    "AdditiveResidual",
    "AffineCoupling",
    "ChannelPermutation",
    "CheckerboardCoupling",
    "ElementwiseAffine",
    "ElementwiseSpline",
    "Flow",
    "FlowSequence",
    "InvConv1x1",
    "InvConv1x1LU",
    "InvertibleResidual",
    "LULinear",
    "LeakyReLU",
    "PiecewiseLinear",
    "Planar",
    "Radial",
    "Reverse",
    "Shuffle",
    "Split",
    "Squeeze",
    "Standardize",
    "TopPrior",
    "VectorCoupling",
    "ZeroConv2d",
    "hutchinson_trace",
    "make_coupling",
    "make_permutation",
    "piecewise_linear",
    "rational_quadratic_spline",
    "standard_normal_log_prob",
    "sum_except_batch",
]
