"""PyTorch backend (``kind = "torch"``): CUDA in bf16 with CUDA graphs for decode, or CPU in float32.

gpt-fast's design behind the engine interface the scheduler already drives:

- **Static KV cache**, one pair of tensors per layer ``[num_slots + 1, heads, max_seq_len + 1, dim]``,
  written in place (``index_put_``) at each token's position. A slot *is* a row, so a sequence
  joining or leaving a decode batch moves no cache bytes; rows of different lengths run together
  (each query sees the keys at positions ``<= its own``). The extra row and column are scratch:
  padding tokens write there, never over a real entry.
- **Decode in CUDA graphs.** On CUDA each (batch bucket, attention width bucket) is captured once
  with ``torch.cuda.CUDAGraph`` and replayed, so a decode step launches one graph instead of
  hundreds of kernels. Batches are padded to a power of two with scratch rows; the attention
  width is rounded up to a power of two, so few graphs cover every length.
- **Weights from memory.** ``safetensors.torch.load`` parses the decrypted bytes; no plaintext
  file is written. bf16 on CUDA, float32 on CPU; weight-only int8/int4 at load (``torch_quant``).

torch is imported only when this engine is chosen: serving on CPU with ONNX Runtime never loads it.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from .base import EngineError, EngineStats, check_rewind
from .ort_session import auto_threads
from .spec import DecoderSpec
from .torch_model import ModelConfig, Transformer, active_weight_bytes

QUANTIZE = ("none", "int8", "int4")
MIN_WIDTH = 64  # smallest attention width bucket of a decode graph


class TorchEngine:
    kind = "torch"

    def __init__(
        self,
        weights: bytes,
        checkpoint_config: dict | bytes,
        spec: DecoderSpec,
        *,
        num_slots: int,
        max_seq_len: int,
        quantize: str = "none",
        device: str | None = None,
        threads: int = 0,
        cuda_graphs: bool = True,
    ):
        from safetensors.torch import load as load_safetensors

        if quantize not in QUANTIZE:
            raise EngineError(f"[engine] quantize must be one of {QUANTIZE}, not {quantize!r}")
        if isinstance(checkpoint_config, (bytes, bytearray)):
            checkpoint_config = json.loads(checkpoint_config)
        self.spec = spec
        self.num_slots = num_slots
        self.max_seq_len = min(max_seq_len, spec.max_positions)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.quantize = quantize
        cfg = ModelConfig.from_hf(checkpoint_config)
        key, value = cfg.cache_shapes()
        expected = (tuple(spec.key_shape), tuple(spec.value_shape))
        if spec.value_is_key:  # a fused graph caches DeepSeek's latent and rotary key as one tensor: same floats
            key, value = (1, key[1] + value[1]), (1, key[1] + value[1])
        if (key, value) != expected:
            raise EngineError(
                f"checkpoint cache shapes {cfg.cache_shapes()} differ from decoder.json "
                f"({spec.key_shape}, {spec.value_shape}); the bundle mixes two models"
            )
        try:
            state = load_safetensors(bytes(weights))
        except Exception as exc:  # safetensors raises its own untyped errors
            raise EngineError(f"the safetensors weights cannot be parsed: {exc}") from None
        state = {k: v.to(self.device, self.dtype) for k, v in state.items()}
        try:
            with torch.no_grad():
                self.model = Transformer(cfg, state, self.max_seq_len, quantize).eval()
        except KeyError as exc:
            raise EngineError(f"checkpoint lacks tensor {exc}; it does not match its config.json") from None
        del state
        self.weight_bytes = active_weight_bytes(self.model)
        if self.device.type == "cpu":
            # As for ONNX Runtime: a thread per 16 MB read per token. More threads than that only
            # wait at OpenMP barriers (a 0.4 MB model decodes ~20x slower on 2 threads of a busy box).
            self.threads = threads or auto_threads(self.weight_bytes) or torch.get_num_threads()
            torch.set_num_threads(self.threads)
        rows, width = num_slots + 1, self.max_seq_len + 1
        self.caches = [
            tuple(torch.zeros(rows, h, width, d, device=self.device, dtype=self.dtype) for h, d in cfg.cache_shapes())
            for _ in range(cfg.num_layers)
        ]
        self._lengths = [0] * num_slots
        self.stats = EngineStats()
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None

    # -- the Engine interface --------------------------------------------------------------------
    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def release(self, slot: int) -> None:
        self._lengths[slot] = 0  # the row's stale entries are invisible: positions restart at 0

    def cache_bytes(self) -> int:
        """KV cache memory held in the preallocated per-layer tensors (read by the metrics scrape)."""
        return sum(t.numel() * t.element_size() for layer in self.caches for t in layer)

    def save(self, slot: int) -> list[torch.Tensor]:
        """A compact copy of the slot's cache, one ``[1,H,L,D]`` tensor per cache tensor."""
        n = self._lengths[slot]
        if n == 0:
            raise EngineError("save of a slot that holds nothing")
        return [t[slot : slot + 1, :, :n].clone() for layer in self.caches for t in layer]

    def load(self, slot: int, cache: list) -> None:
        """Restore a cache made by ``save`` into an empty slot (copied: the saved one stays valid)."""
        if self._lengths[slot]:
            raise EngineError("load into a slot that is in use")
        n = int(cache[0].shape[2])
        if n > self.max_seq_len:
            raise EngineError(f"saved cache of {n} tokens exceeds max_seq_len {self.max_seq_len}")
        flat = [t for layer in self.caches for t in layer]
        if len(cache) != len(flat):
            raise EngineError(f"saved cache has {len(cache)} tensors, this model {len(flat)}")
        for dst, src in zip(flat, cache, strict=True):
            dst[slot, :, :n] = torch.as_tensor(src[0], device=self.device, dtype=self.dtype)
        self._lengths[slot] = n

    @torch.inference_mode()
    def prefill(self, batch: list[tuple[int, list[int]]]) -> np.ndarray:
        """Append each row's tokens to its slot; returns the logits after each row's last token."""
        return self._append(batch, last=True)[:, 0].float().cpu().numpy()

    @torch.inference_mode()
    def verify(self, batch: list[tuple[int, list[int]]]) -> list[np.ndarray]:
        """Append each row's tokens; the logits at every new position, ``[len(ids), vocab]`` per row."""
        logits = self._append(batch, last=False).float().cpu().numpy()
        return [logits[row, : len(ids)] for row, (_, ids) in enumerate(batch)]

    def rewind(self, slot: int, length: int) -> None:
        """Keep the first ``length`` positions; attention masks by length, the next append overwrites the rest."""
        check_rewind(self._lengths[slot], length)
        self._lengths[slot] = length

    def _append(self, batch: list[tuple[int, list[int]]], last: bool) -> torch.Tensor:
        sizes = [len(ids) for _, ids in batch]
        lengths = [self._lengths[slot] for slot, _ in batch]
        if min(sizes) == 0:
            raise EngineError("prefill of an empty token list")
        for length, size in zip(lengths, sizes, strict=True):
            if length + size > self.max_seq_len:
                raise EngineError(f"sequence of {length + size} tokens exceeds max_seq_len {self.max_seq_len}")
        n, new = len(batch), max(sizes)
        ids = np.full((n, new), self.spec.pad_token_id, np.int64)
        positions = np.zeros((n, new), np.int64)
        write = np.full((n, new), self.max_seq_len, np.int64)  # padding writes to the scratch column
        for row, ((_, tokens), length, size) in enumerate(zip(batch, lengths, sizes, strict=True)):
            ids[row, :size] = tokens
            positions[row, :size] = write[row, :size] = np.arange(length, length + size)
        logits = self.model(
            self._tensor(ids),
            self._tensor(np.array([slot for slot, _ in batch])),
            self._tensor(positions),
            self._tensor(write),
            max(length + size for length, size in zip(lengths, sizes, strict=True)),
            self.caches,
            last=self._tensor(np.array(sizes) - 1) if last else None,
        )
        for (slot, _), size in zip(batch, sizes, strict=True):
            self._lengths[slot] += size
        self.stats.appended(sizes, verify=not last)
        return logits

    @torch.inference_mode()
    def decode(self, batch: list[tuple[int, int]]) -> np.ndarray:
        """Append one ``(slot, token)`` per row; returns next-token logits ``[len(batch), vocab]``."""
        lengths = [self._lengths[slot] for slot, _ in batch]
        if min(lengths) == 0:
            raise EngineError("decode on a slot that was never prefilled")
        if max(lengths) + 1 > self.max_seq_len:
            raise EngineError(f"sequence would exceed max_seq_len {self.max_seq_len}")
        n = len(batch)
        ids = np.array([[tok] for _, tok in batch], np.int64)
        rows = np.array([slot for slot, _ in batch], np.int64)
        positions = np.array([[length] for length in lengths], np.int64)
        if self.cuda_graphs:
            logits = self._replay(ids, rows, positions)[:n]
        else:
            t = self._tensor
            logits = self.model(
                t(ids), t(rows), t(positions), t(positions), max(lengths) + 1, self.caches, gather_experts=True
            )[:, 0]
        for slot, _ in batch:
            self._lengths[slot] += 1
        self.stats.decode_steps += 1
        return logits.float().cpu().numpy()

    @torch.inference_mode()
    def score(self, tokens: list[int]) -> np.ndarray:
        """Logits at every position of ``tokens`` ``[S, vocab]`` in a private cache (for perplexity)."""
        n = len(tokens)
        if n > self.max_seq_len:
            raise EngineError(f"score of {n} tokens exceeds max_seq_len {self.max_seq_len}")
        scratch = [tuple(torch.zeros(1, *t.shape[1:], device=self.device, dtype=self.dtype) for t in layer)
                   for layer in self.caches]  # fmt: skip
        at = self._tensor(np.arange(n)[None])
        logits = self.model(self._tensor(np.array([tokens])), self._tensor(np.array([0])), at, at, n, scratch)
        return logits[0].float().cpu().numpy()

    # -- CUDA graphs -------------------------------------------------------------------------------
    def _replay(self, ids: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        n = len(rows)
        bucket = min(1 << (n - 1).bit_length(), self.num_slots) if n <= self.num_slots else n
        need = int(positions.max()) + 1
        width = min(self.max_seq_len, max(MIN_WIDTH, 1 << (need - 1).bit_length()))
        graph, static, out = self._graph(bucket, width)
        pad = bucket - n
        static["ids"].copy_(self._tensor(np.pad(ids, ((0, pad), (0, 0)))))
        static["rows"].copy_(self._tensor(np.pad(rows, (0, pad), constant_values=self.num_slots)))
        static["positions"].copy_(self._tensor(np.pad(positions, ((0, pad), (0, 0)))))
        static["write"].copy_(self._tensor(np.pad(positions, ((0, pad), (0, 0)), constant_values=self.max_seq_len)))
        graph.replay()
        return out

    def _graph(self, bucket: int, width: int) -> tuple:
        """Capture the decode step for ``bucket`` rows over ``width`` key positions (once)."""
        key = (bucket, width)
        if key in self._graphs:
            return self._graphs[key]
        dev = self.device
        static = {
            "ids": torch.zeros(bucket, 1, dtype=torch.long, device=dev),
            "rows": torch.full((bucket,), self.num_slots, dtype=torch.long, device=dev),  # scratch row
            "positions": torch.zeros(bucket, 1, dtype=torch.long, device=dev),
            "write": torch.full((bucket, 1), self.max_seq_len, dtype=torch.long, device=dev),
        }

        def step():
            s = static
            return self.model(s["ids"], s["rows"], s["positions"], s["write"], width, self.caches, gather_experts=True)[
                :, 0
            ]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture (allocator, cuBLAS handles)
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step()
        self._pool = graph.pool()
        self._graphs[key] = (graph, static, out)
        return self._graphs[key]

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(self.device, non_blocking=True)
