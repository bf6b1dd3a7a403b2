"""torch.compile must trace kbit layers as one graph, with the M-dependent kernel choice inside the op."""

import pytest
import torch

from vllm_kbit import format as kfmt

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def kbit_layer(vllm_context):
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_kbit.config import KbitConfig

    cfg = KbitConfig.from_config({"bits": 3, "packed": True})
    layer = RowParallelLinear(256, 96, bias=True, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    weight = torch.randn(96, 256)
    packed = kfmt.quantize(weight, 3)
    for name, tensor in (("qweight", packed.qweight), ("qweight_absmax", packed.absmax),
                         ("weight_scale", packed.scale), ("bias", torch.randn(96))):
        param = getattr(layer, name)
        param.weight_loader(param, tensor)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def test_fullgraph_trace_has_no_graph_break(kbit_layer):
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x: kbit_layer(x)[0], backend=backend, fullgraph=True, dynamic=True)
    # One trace must serve every M, i.e. no branch on M outside the op. (M = 1 is left out: Dynamo
    # itself specializes sizes 0 and 1.)
    for m in (2, 3, 17, 40):
        x = torch.randn(m, 256)
        torch.testing.assert_close(compiled(x), kbit_layer(x)[0])
    assert len(graphs) == 1
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.kbit.gemm in ops


def test_opcheck(kbit_layer):
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    args = (x, kbit_layer.qweight, kbit_layer.qweight_absmax, kbit_layer.weight_scale, kbit_layer.kbit_codebook, 3)
    torch.library.opcheck(torch.ops.kbit.gemm.default, args, test_utils=("test_schema", "test_faketensor"))


def test_eager_layer_skips_the_dispatcher(kbit_layer):
    # In eager mode a layer calls the op's implementation directly (ops.layer_gemm), not through the dispatcher,
    # which compiled graphs need and eager calls only pay for; the result is the op's.
    from torch.utils._python_dispatch import TorchDispatchMode

    called = []

    class RecordOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            called.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.randn(3, 256)
    with RecordOps():
        eager = kbit_layer(x)[0]
    assert called and torch.ops.kbit.gemm.default not in called
    with RecordOps():
        via_op = torch.ops.kbit.gemm(x, kbit_layer.qweight, kbit_layer.qweight_absmax, kbit_layer.weight_scale,
                                     kbit_layer.kbit_codebook, 3) + kbit_layer.bias
    assert torch.ops.kbit.gemm.default in called  # the recorder does see the op when it is called
    torch.testing.assert_close(eager, via_op)


def test_layer_entry_takes_the_op_for_fake_and_meta_tensors_and_under_the_profiler(kbit_layer):
    # Fake and meta tensors need the op's fake; a profile names each op call: ops.layer_gemm goes through the op.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vllm_kbit import ops

    weights = (kbit_layer.qweight, kbit_layer.qweight_absmax, kbit_layer.weight_scale)
    codebook = kbit_layer.kbit_codebook
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = ops.layer_gemm(torch.empty(3, 256), *weights, codebook, 3)
    assert fake.shape == (3, 96) and type(fake) is not torch.Tensor
    meta = ops.layer_gemm(torch.empty(3, 256, device="meta"), *(w.to("meta") for w in weights), codebook, 3)
    assert meta.is_meta and meta.shape == (3, 96)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        kbit_layer(torch.randn(3, 256))
    assert "kbit::gemm" in {event.name for event in profile.events()}
