"""Edge methods: the networks that run on the device, addressable by registered name."""

from mist_kit.edge.base import EdgeMethod
from mist_kit.edge.lae import LinearProbe, LowRankAttentionEdge
from mist_kit.edge.losa import LowRankSideNetwork
from mist_kit.edge.registry import create_edge_method, get_edge_method, list_edge_methods, register_edge_method
from mist_kit.edge.vitsplit import ViTSplitEdge, ViTSplitLiteEdge  # noqa: F401 - registers vitsplit, vitsplit-lite

__all__ = [
    "EdgeMethod",
    "LinearProbe",
    "LowRankAttentionEdge",
    "LowRankSideNetwork",
    "create_edge_method",
    "get_edge_method",
    "list_edge_methods",
    "register_edge_method",
]
