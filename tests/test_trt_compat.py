"""The TensorRT compatibility check: our exported graph passes; each kind of graph TensorRT's parser
refuses is named by node and operator. Runs everywhere (onnx only; no TensorRT, no GPU)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper, save

from mixtral_export.graphs.trt_compat import TrtCompatError, check_trt_compat


def test_the_exported_tiny_graph_passes(tiny_onnx):
    report = check_trt_compat(tiny_onnx)  # the artifact folder: its manifest's step graph
    print("\n" + "\n".join(report.lines()))
    assert report.ok, report.lines()
    assert report.path == tiny_onnx / "model.onnx" and report.opset == 18
    assert {"TopK", "ScatterElements", "Softmax", "MatMul", "Gather"} <= set(report.op_counts)
    assert check_trt_compat(tiny_onnx / "model.onnx").findings == ()


def graph_file(tmp_path, nodes, inputs, outputs, initializers=(), value_info=(), opset=18, domains=()):
    """A one-off ONNX model saved to a file (not checked by onnx: some are invalid on purpose)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    path = tmp_path / "g.onnx"
    save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def x(name="x", dims=("T", 8), elem=TP.FLOAT):
    return helper.make_tensor_value_info(name, elem, list(dims))


def only(report, node):
    found = [f for f in report.findings if f.node == node]
    assert found, report.lines()
    return found


def test_a_contrib_operator_is_named(tmp_path):
    path = graph_file(tmp_path, [helper.make_node("FastGelu", ["x"], ["y"], name="gelu_0", domain="com.microsoft")],
                      [x()], [x("y")], domains=["com.microsoft"])
    report = check_trt_compat(path)
    assert not report.ok
    (finding,) = only(report, "gelu_0")
    assert finding.op_type == "FastGelu" and "'com.microsoft'" in finding.problem and "plugin" in finding.problem


def test_an_unsupported_operator_and_a_string_tensor_are_named(tmp_path):
    node = helper.make_node("StringNormalizer", ["s"], ["t"], name="normalize", case_change_action="LOWER")
    path = graph_file(tmp_path, [node], [x("s", (4,), TP.STRING)], [x("t", (4,), TP.STRING)])
    report = check_trt_compat(path)
    problems = [f.problem for f in only(report, "normalize")]
    assert any("not supported by TensorRT 10's ONNX parser" in p for p in problems)
    assert any("'t' is string" in p for p in problems)  # its output
    assert [f.op_type for f in only(report, "s")] == ["graph input"]


def test_a_float64_tensor_is_named(tmp_path):
    path = graph_file(tmp_path, [helper.make_node("Cast", ["x"], ["d"], name="to_double", to=TP.DOUBLE),
                                 helper.make_node("Cast", ["d"], ["y"], name="back", to=TP.FLOAT)],
                      [x()], [x("y")])
    (finding,) = check_trt_compat(path).findings
    assert (finding.node, finding.op_type) == ("to_double", "Cast")
    assert "'d' is double" in finding.problem and "export float32" in finding.problem


def test_topk_with_a_computed_k_is_named(tmp_path):
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape", start=1),  # (1,) int64: 8
             helper.make_node("TopK", ["x", "shape"], ["values", "indices"], name="route", axis=-1)]
    path = graph_file(tmp_path, nodes, [x()], [x("values"), x("indices", elem=TP.INT64)])
    (finding,) = check_trt_compat(path).findings
    assert (finding.node, finding.op_type) == ("route", "TopK")
    assert "`K`" in finding.problem and "build-time constant" in finding.problem and "fold" in finding.problem


def test_topk_with_a_constant_k_passes_but_not_unsorted(tmp_path):
    k = numpy_helper.from_array(np.array([2], dtype=np.int64), "k")
    nodes = [helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="route", axis=-1, sorted=0)]
    path = graph_file(tmp_path, nodes, [x()], [x("values", ("T", 2)), x("indices", ("T", 2), TP.INT64)], [k])
    (finding,) = check_trt_compat(path).findings
    assert finding.node == "route" and "`sorted` must be 1" in finding.problem


def test_a_dynamic_dim_other_than_the_chunk_axis_is_named(tmp_path):
    path = graph_file(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="relu")],
                      [x(dims=("batch", "T"))], [x("y", ("batch", "T"))])
    report = check_trt_compat(path)
    assert {(f.node, f.op_type) for f in report.findings} == {("x", "graph input"), ("y", "graph output")}
    assert all("'batch'" in f.problem and "'T'" in f.problem for f in report.findings)


def test_an_inner_dim_not_derived_from_the_chunk_axis_is_named(tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["h"], name="view"),
             helper.make_node("Relu", ["h"], ["y"], name="out")]
    inner = x("h", ("T", "s7"))  # as if the exporter had lost a static dim
    inputs = [x(), x("shape", (2,), TP.INT64)]
    report = check_trt_compat(graph_file(tmp_path, nodes, inputs, [x("y", ("T", 8))], value_info=[inner]))
    (finding,) = report.findings
    assert (finding.node, finding.op_type) == ("view", "Reshape") and "s7" in finding.problem


def test_matmul_on_integers_and_a_high_opset_are_named(tmp_path):
    nodes = [helper.make_node("MatMul", ["a", "a"], ["b"], name="int_matmul")]
    path = graph_file(tmp_path, nodes, [x("a", (4, 4), TP.INT64)], [x("b", (4, 4), TP.INT64)], opset=21)
    report = check_trt_compat(path)
    assert "opset 21" in only(report, "g.onnx")[0].problem
    assert "int64" in only(report, "int_matmul")[0].problem


def test_missing_external_weights_are_named(tmp_path):
    weight = TP(name="w", data_type=TP.FLOAT, dims=[8, 8], data_location=TP.EXTERNAL)
    weight.external_data.add(key="location", value="gone.data")
    path = graph_file(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [x()], [x("y")], [weight])
    (finding,) = check_trt_compat(path).findings
    assert finding.node == "gone.data" and "not found next to g.onnx" in finding.problem


def test_an_unreadable_file_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\x00 not protobuf")
    with pytest.raises(TrtCompatError, match="bad.onnx: not a readable ONNX graph") as info:
        check_trt_compat(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(TrtCompatError, match="no such ONNX graph"):
        check_trt_compat(tmp_path / "missing.onnx")
