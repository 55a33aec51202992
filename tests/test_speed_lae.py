"""The restructured LAE (training forward and the exported inference graph) against the paper's formula, and the
per-node int8 decisions of the edge graph.

Reference: `reference_embed`, the formula token for token (every token through every block, three projections,
final norm on every token). Blocks get non-zero output projections (a fresh LAE is the identity) and the inputs
include an outlier-heavy "real-like" gather (ViT residual streams carry a few channels 50-100x the rest).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mist_kit.edge import create_edge_method
from mist_kit.edge.lae import LowRankAttentionEdge, reference_embed
from mist_kit.runtime.plan import BackboneShape

T, D, C = 17, 64, 5


def _lae(pool: str = "cls", seed: int = 0, tokens: int = T, dim: int = D) -> LowRankAttentionEdge:
    torch.manual_seed(seed)
    m = create_edge_method("mist", backbone=BackboneShape(dim, tokens, 1, 6), depth=3, num_classes=C,
                           params={"pool": pool, "dropout": 0.0})  # train-mode parity: no dropout noise
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a "trained" LAE: every parameter moved off its init
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return m.eval()


def _features(kind: str, batch: int = 3, tokens: int = T, dim: int = D, seed: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, dim, generator=gen)
    if kind == "real-like":  # heavy tails and a few massive channels, as ViT gathers have
        x = x * torch.distributions.StudentT(3.0).sample((batch, tokens, 1)).abs().clamp(max=20)
        x[..., :3] *= 60.0
    return {"gather": x}


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("kind", ["random", "real-like"])
def test_restructured_paths_equal_the_formula(pool: str, kind: str) -> None:
    from mist_kit.exporters.edge_onnx import EMBEDDING, export_edge
    from mist_kit.runtime.edge_session import edge_ort_session

    m = _lae(pool)
    x = _features(kind)
    with torch.no_grad():
        ref = reference_embed(m, x)
        train = m.embed(x)
        inference = m.inference_module().embed(x)
    scale = float(ref.abs().max())
    assert scale > 0.5  # LayerNorm-bounded, non-trivial
    torch.testing.assert_close(train, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(inference, ref, rtol=0, atol=1e-5)
    graph = edge_ort_session(export_edge(m).SerializeToString())
    got = graph.run([EMBEDDING], {"gather": x["gather"].numpy()})[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)


def test_training_forward_logits_and_gradients_equal_the_formula() -> None:
    m = _lae("cls").train()
    x = _features("real-like", batch=4)
    y = torch.tensor([0, 1, 2, 3])
    grads = []
    for fn in (lambda: m(x), lambda: m.head(reference_embed(m, x))):
        m.zero_grad()
        logits = fn()
        torch.nn.functional.cross_entropy(logits, y).backward()
        grads.append((logits.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
    (a, ga), (b, gb) = grads
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_state_dict_keys_are_unchanged() -> None:
    """Checkpoints written before the restructure keep loading: three q/k/v Linears per block, same names."""
    keys = set(_lae().state_dict())
    per_block = {f"blocks.{i}.{p}.{w}" for i in range(4) for p in ("norm", "q", "k", "v", "o")
                 for w in ("weight", "bias")}
    assert keys == per_block | {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_exported_graph_has_one_fused_projection_per_block_and_a_cls_row_last_block() -> None:
    from mist_kit.exporters.edge_onnx import export_edge
    from mist_kit.exporters.int8_nodes import preselect

    decisions = preselect(export_edge(_lae("cls")), ("MatMul", "Gemm"))
    yes = [d for d in decisions if d.int8]
    # 3 fused D -> 3r projections, then the last block's D -> 2r (k|v) and its D -> r (cls query)
    assert sorted(d.reduction for d in yes) == [D] * 5
    no = [d for d in decisions if not d.int8]
    assert len(no) == 4 * 3  # per block: q k^T, attn @ v (activations) and the K = r output projection
    assert sum("activations" in d.why for d in no) == 8 and sum("K=16" in d.why for d in no) == 4


def test_quantize_edge_records_a_decision_per_node_and_quantizes_only_the_chosen(tmp_path) -> None:
    from mist_kit.calibration.modes import resolve_modes
    from mist_kit.exporters.edge_onnx import export_edge
    from mist_kit.exporters.onnx_utils import int8_op_counts
    from mist_kit.exporters.quantize import quantize_edge
    from mist_kit.runtime.bundle import Head

    m = _lae("cls")
    fp32 = export_edge(m)
    batches = [{"gather": _features("random", batch=8, seed=s)["gather"].numpy()} for s in range(3)]
    head = Head(m.head.weight.detach().numpy(), m.head.bias.detach().numpy(), tuple("abcde"))
    res = quantize_edge(fp32, resolve_modes("dynamic"), batches, batches, head, None, 0.0, log=lambda _m: None)
    nodes = res.chosen.to_dict()["nodes"]
    matmuls = [n.name for n in fp32.graph.node if n.op_type == "MatMul"]
    assert sorted(n["node"] for n in nodes) == sorted(matmuls)
    assert all(set(n) == {"node", "op_type", "int8", "why", "reduction_dim"} and n["why"] for n in nodes)
    int8 = [n["node"] for n in nodes if n["int8"]]
    assert int8 and all(n["reduction_dim"] == D for n in nodes if n["int8"])
    # the saved graph quantizes exactly the nodes recorded as int8 (dynamic: one MatMulInteger each)
    assert int8_op_counts(res.chosen.model).get("MatMulInteger", 0) == len(int8)
    assert res.chosen.to_dict()["mode"]["quantized_nodes"] == int8
    assert res.fp32_latency_ms and res.fp32_latency_ms > 0
