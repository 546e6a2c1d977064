"""Every engine declares the whole ``Engine`` Protocol (appliance/engine/base.py): each method with the Protocol's
parameters, each attribute set. Checked on the classes' source, so the TensorRT engine is checked on a machine
without TensorRT, and on live engines where they run here."""

from __future__ import annotations

import ast
import inspect
import textwrap

import numpy as np
import pytest

from appliance.engine import DecoderSpec, create_engine
from appliance.engine.base import Engine, EngineStats
from appliance.engine.ort_engine import OrtEngine
from appliance.engine.static_cache import StaticCacheEngine
from appliance.engine.torch_engine import TorchEngine
from appliance.engine.trt_engine import TrtEngine

METHODS = {n: inspect.signature(f) for n, f in vars(Engine).items() if inspect.isfunction(f) and not n.startswith("_")}
ATTRIBUTES = set(Engine.__annotations__)


def assigned(cls: type) -> set[str]:
    """Attributes a class (or a base) sets: class-level names and ``self.X = …`` in any method."""
    names: set[str] = set()
    for klass in cls.__mro__[:-1]:
        names |= set(vars(klass))
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if isinstance(target, ast.Tuple):
                    targets.extend(target.elts)
                elif isinstance(target, ast.Attribute) and getattr(target.value, "id", None) == "self":
                    names.add(target.attr)
    return names


def test_the_protocol_names_what_callers_use():
    assert {"prefill", "decode", "verify", "rewind", "length", "release", "save", "load", "cache_bytes",
            "score"} <= set(METHODS)  # fmt: skip
    assert {"kind", "spec", "num_slots", "max_seq_len", "stats"} <= ATTRIBUTES


@pytest.mark.parametrize("cls", [StaticCacheEngine, OrtEngine, TorchEngine, TrtEngine], ids=lambda c: c.__name__)
def test_every_engine_declares_the_whole_protocol(cls):
    for name, want in METHODS.items():
        impl = getattr(cls, name, None)
        assert callable(impl), f"{cls.__name__} lacks {name}()"
        got = list(inspect.signature(impl).parameters)
        assert got == list(want.parameters), f"{cls.__name__}.{name}{got} differs from the Protocol's {want}"
    missing = ATTRIBUTES - assigned(cls)
    assert not missing, f"{cls.__name__} never sets {sorted(missing)}"


def test_live_engines_are_engines(tiny_build, traced_teacher):
    for graph in (tiny_build / "onnx", traced_teacher):
        spec = DecoderSpec.from_json((graph / "decoder.json").read_text())
        engine = create_engine("onnxruntime", (graph / "model.onnx").read_bytes(), spec, num_slots=1, max_seq_len=64)
        assert isinstance(engine, Engine) and isinstance(engine.stats, EngineStats)
        scored = engine.score([1, 5, 9, 4])
        engine.prefill([(0, [1, 5, 9, 4])])  # score used a private cache: the slot was untouched until now
        assert scored.shape == (4, spec.vocab_size) and engine.length(0) == 4
        np.testing.assert_allclose(engine.verify([(0, [7])])[0][0], engine.score([1, 5, 9, 4, 7])[-1], atol=1e-4)
