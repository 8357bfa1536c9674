"""Flow layers in pure torch.

Every layer maps data towards the latent space with ``forward(x) -> (y, logdet)``, ``logdet`` of
shape ``(B,)``, and back with ``inverse(y) -> x``.
"""

from glowlab.flows.actnorm import ActNorm
from glowlab.flows.base import Flow, FlowSequence, standard_normal_log_prob, sum_except_batch
from glowlab.flows.conv1x1 import InvConv1x1, InvConv1x1LU
from glowlab.flows.coupling import COUPLINGS, AdditiveCoupling, AffineCoupling, make_coupling
from glowlab.flows.nn import ZeroConv2d
from glowlab.flows.permutations import PERMUTATIONS, ChannelPermutation, Reverse, Shuffle, make_permutation
from glowlab.flows.priors import Split, TopPrior
from glowlab.flows.squeeze import Squeeze

__all__ = [
    "COUPLINGS",
    "PERMUTATIONS",
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "ChannelPermutation",
    "Flow",
    "FlowSequence",
    "InvConv1x1",
    "InvConv1x1LU",
    "Reverse",
    "Shuffle",
    "Split",
    "Squeeze",
    "TopPrior",
    "ZeroConv2d",
    "make_coupling",
    "make_permutation",
    "standard_normal_log_prob",
    "sum_except_batch",
]
