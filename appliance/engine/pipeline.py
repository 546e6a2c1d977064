"""One decoder graph run as a few ONNX Runtime sessions in sequence, so its weights can be loaded piece by piece.

ONNX Runtime prepacks ``MatMulNBits`` weights into its own layout while a session is built, and only then stops
reading the decrypted originals. Built as one session, the whole packed copy and the whole decrypted buffer coexist
at the end of the build (1.5B q4: peak 2.1x the model's bytes). Built as ``pieces`` sessions over consecutive layers,
each piece's originals are handed back (``weights.release_prepacked``) before the next piece is packed, so the peak
is the buffer plus one piece's packed weights.

``split_graph`` cuts the node list where few tensors cross (a layer boundary: hidden state and residual), each piece
taking the graph inputs and outputs it touches. ``PipelineSession`` and ``PipelineBinding`` offer the part of
``InferenceSession``/``IOBinding`` the engines use; tensors crossing a cut are ONNX Runtime's outputs of one piece
bound as inputs of the next (no copy). Each extra piece costs one ``run`` per step (~20 us on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import EngineError
from .weights import WeightsStillReadError

MAX_CROSSING = 8  # tensors a cut may pass from one piece to the next


def split_graph(model: bytes, pieces: int) -> list[bytes]:
    """``model`` as up to ``pieces`` consecutive subgraphs of about equal weight bytes (one if no cut fits)."""
    import onnx

    proto = onnx.ModelProto.FromString(model)
    graph = proto.graph
    nodes = list(graph.node)
    if pieces <= 1 or len(nodes) < 2:
        return [model]
    sizes = {t.name: _tensor_bytes(t) for t in graph.initializer}
    last_use: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for name in node.input:
            if name:  # "" is an omitted optional input
                last_use[name] = k
    weight_at = np.cumsum([sum(sizes.get(n, 0) for n in node.input) for node in nodes])
    # live[k]: tensors made by nodes <= k that a node > k reads (what a cut after node k passes on)
    types = element_types(graph)
    live: list[set[str]] = []
    open_: set[str] = set()
    for k, node in enumerate(nodes):
        open_ |= {o for o in node.output if o and last_use.get(o, -1) > k}
        open_ = {t for t in open_ if last_use[t] > k}
        live.append(set(open_))
    cuts = []
    for j in range(1, pieces):
        target = weight_at[-1] * j / pieces
        fits = [
            k
            for k in range(len(nodes) - 1)
            if 0 < len(live[k]) <= MAX_CROSSING and all(t in types for t in live[k]) and (not cuts or k > cuts[-1])
        ]
        if not fits:
            break
        cuts.append(min(fits, key=lambda k: (abs(weight_at[k] - target), len(live[k]))))
    bounds = [0, *(k + 1 for k in cuts), len(nodes)]
    outputs = {o.name: o for o in graph.output}
    inputs = {i.name: i for i in graph.input}
    out = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        part = nodes[a:b]
        read = [n for node in part for n in node.input if n]
        made = {o for node in part for o in node.output}
        crossing_in = sorted(live[a - 1]) if a else []
        crossing_out = sorted(live[b - 1]) if b < len(nodes) else []
        sub = onnx.helper.make_graph(
            part,
            f"{graph.name}.{len(out)}",
            [inputs[n] for n in dict.fromkeys(read) if n in inputs]
            + [onnx.helper.make_tensor_value_info(n, types[n], None) for n in crossing_in],
            [o for name, o in outputs.items() if name in made]
            + [onnx.helper.make_tensor_value_info(n, types[n], None) for n in crossing_out],
            [t for t in graph.initializer if t.name in set(read)],
        )
        piece = onnx.helper.make_model(sub, opset_imports=proto.opset_import, ir_version=proto.ir_version)
        out.append(piece.SerializeToString())
    return out


# Ops whose output has the element type of their first input (what the decoder graphs are built from).
SAME_AS_FIRST = {
    "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Pow", "Sigmoid", "Tanh", "Relu", "QuickGelu", "Softmax", "Range",
    "Split", "Reshape", "Transpose", "Concat", "Slice", "Squeeze", "Unsqueeze", "Expand", "Gather", "ReduceMean",
    "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization", "RotaryEmbedding",
    "GroupQueryAttention", "MatMul", "MatMulNBits", "Gemm", "MoE", "QMoE",
}  # fmt: skip


def element_types(graph) -> dict[str, int]:
    """The element type of every tensor whose type follows from the graph's inputs, initializers and the rules
    above (a cut may only pass tensors listed here)."""
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    types.update((t.name, t.data_type) for t in graph.initializer)
    for node in graph.node:
        if node.op_type == "Cast":
            out = next(a.i for a in node.attribute if a.name == "to")
        elif node.op_type in ("Shape", "Size"):
            out = 7  # INT64
        elif node.op_type == "GatherBlockQuantized":
            out = types.get(node.input[2])  # the scales' type
        elif node.op_type in SAME_AS_FIRST:
            out = types.get(node.input[0])
        else:
            out = None
        if out:
            types.update((o, out) for o in node.output if o)
    return types


def _tensor_bytes(tensor) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(tensor.raw_data)


class PipelineSession:
    """``InferenceSession``-like over consecutive piece sessions: inputs and outputs are the whole graph's."""

    def __init__(self, sessions: list, inputs: list[str], outputs: list[str]):
        """``inputs``/``outputs``: the whole graph's, in its order."""
        self.sessions = sessions
        ins = {i.name: i for s in sessions for i in s.get_inputs()}
        outs = {o.name: o for s in sessions for o in s.get_outputs()}
        self._inputs = [ins[n] for n in inputs if n in ins]
        self._outputs = [outs[n] for n in outputs]

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs

    def io_binding(self) -> PipelineBinding:
        return PipelineBinding(self)

    def run_with_iobinding(self, io: PipelineBinding, run_options=None) -> None:
        io.run(run_options)

    def run(self, names, feeds: dict) -> list:
        io = self.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        wanted = names or [o.name for o in self._outputs]
        for name in wanted:
            io.bind_output(name, "cpu")
        io.run(None)
        got = dict(zip(io.output_names, io.get_outputs(), strict=True))
        return [got[n].numpy() for n in wanted]


class PipelineBinding:
    """An ``IOBinding`` per piece; each bind goes to the pieces that have the name; crossing tensors are bound
    from one piece's outputs to the next's inputs at every run."""

    def __init__(self, session: PipelineSession):
        # per piece: session, binding, input names, output names, and the names bound as outputs in the order they
        # were first bound (ONNX Runtime's ``get_outputs`` order; binding a name again replaces it in place)
        self.pieces = [(s, s.io_binding(), {i.name for i in s.get_inputs()}, {o.name for o in s.get_outputs()}, [])
                       for s in session.sessions]  # fmt: skip
        self.output_names: list[str] = []
        self._last: list = []

    def _each(self, name: str, outputs: bool):
        found = False
        for _, io, ins, outs, order in self.pieces:
            if name in (outs if outputs else ins):
                found = True
                if outputs and name not in order:
                    order.append(name)
                yield io
        if not found:
            raise EngineError(f"no piece of the graph has {'output' if outputs else 'input'} {name!r}")

    def bind_input(self, name, *args) -> None:
        for io in self._each(name, False):
            io.bind_input(name, *args)

    def bind_cpu_input(self, name, array) -> None:
        for io in self._each(name, False):
            io.bind_cpu_input(name, array)

    def bind_ortvalue_input(self, name, value) -> None:
        for io in self._each(name, False):
            io.bind_ortvalue_input(name, value)

    def bind_output(self, name, *args) -> None:
        for io in self._each(name, True):
            io.bind_output(name, *args)
        if name not in self.output_names:
            self.output_names.append(name)

    def run(self, run_options=None) -> None:
        carried: dict = {}
        for session, io, ins, outs, order in self.pieces:
            for name in ins & carried.keys():
                io.bind_ortvalue_input(name, carried[name])
            for name in sorted(outs - set(self.output_names)):  # crossing tensors: ONNX Runtime allocates them
                io.bind_output(name, "cpu")
                if name not in order:
                    order.append(name)
            session.run_with_iobinding(io, run_options)
            carried.update(zip(order, io.get_outputs(), strict=True))
        self._last = [carried[n] for n in self.output_names]

    def get_outputs(self) -> list:
        return self._last


def build_pieces(
    model: bytes, pieces: int, create: Callable[[bytes], object], release: Callable[[Callable, set[str]], int]
) -> tuple[PipelineSession | object, int]:
    """Create each piece's session and, before the next is created, release the weights no later piece reads
    (``release(probe, names)``, as ``weights.release_prepacked`` takes them after its ranges and buffers); returns
    the session (a plain one for a single piece) and the bytes released."""
    import onnx

    graph = onnx.ModelProto.FromString(model).graph
    readers = [{t.name for t in onnx.ModelProto.FromString(p).graph.initializer} for p in pieces]
    sessions, released, carried = [], 0, {}
    for k, piece in enumerate(pieces):
        try:
            session = create(piece)
        except EngineError as exc:
            if len(pieces) == 1:
                raise
            raise WeightsStillReadError(f"piece {k + 1} of {len(pieces)} does not build ({exc})") from None
        sessions.append(session)
        feeds = _probe_feeds(session, carried)
        names = [o.name for o in session.get_outputs()]
        last: list = []  # the probe's latest outputs: the next piece's probe input

        def probe(s=session, f=feeds, n=names, last=last, k=k) -> list:
            try:
                last[:] = s.run(n, f)
            except Exception as exc:  # onnxruntime raises its own untyped errors
                raise WeightsStillReadError(f"the probe of piece {k + 1} fails ({exc})") from None
            return list(last)

        released += release(probe, readers[k] - set().union(*readers[k + 1 :]))
        carried.update(zip(names, last or probe(), strict=True))
    if len(sessions) == 1:
        return sessions[0], released
    return PipelineSession(sessions, [i.name for i in graph.input], [o.name for o in graph.output]), released


PROBE_IDS = [0, 1, 2, 3]


def _probe_feeds(session, carried: dict) -> dict:
    """A fixed input for one piece: token ids, zero caches of 8 positions, and the previous piece's outputs."""
    feeds = {}
    for i in session.get_inputs():
        if i.name in carried:
            feeds[i.name] = carried[i.name]
        elif i.name == "input_ids":
            feeds[i.name] = np.array([PROBE_IDS], np.int64)
        elif i.name == "seqlens_k":
            feeds[i.name] = np.array([len(PROBE_IDS) - 1], np.int32)
        elif i.name == "total_sequence_length":
            feeds[i.name] = np.array(len(PROBE_IDS), np.int32)
        else:  # a cache input [batch, heads, positions, dim]
            feeds[i.name] = np.zeros([1, i.shape[1], 8, i.shape[3]], np.float32)
    return feeds
