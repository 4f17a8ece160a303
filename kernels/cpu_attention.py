"""The CPU decode kernels: kernels/cpu_attention.c, built on first use and loaded with ctypes.

Two entry points:
- `ragged_decode_attention`: the decode step's attention, one call per layer. In torch it is
  memory-bound work done by small ops (per layer a batched matrix-vector product per (row, head),
  a bias, a softmax and a second product, over every row padded to the longest); the kernel reads
  each row's own slots once (docs/engine.md, "The ragged decode attention");
- `decode_layers`: every layer of the fused decode step in one call, for the batches where the
  step is op dispatch rather than arithmetic (docs/engine.md, "The decode step in C").

Building: the system C compiler (`$CC`, else `cc`) with `-O3 -mavx2 -mfma`, about a second, no
torch headers. The shared object is cached under `$CASA_KERNEL_CACHE` (default
`~/.cache/casa-live/kernels`), named by a hash of the source and the flags, so an edited source
builds anew, a second start builds nothing, and a prebuilt one loads where no compiler is: the
container image builds it in its wheel stage (`python kernels/cpu_attention.py DIR`, which needs
neither torch nor casa-live) and ships it (Dockerfile). Without a compiler and no prebuilt file,
on a CPU without AVX2 and FMA, or with `CASA_CPU_KERNELS=0`, `library()` is None and the torch
path runs: the same results to fp32 rounding (tests/test_cpu_attention.py).

The attention op is called with `ctypes.PyDLL`, which keeps the GIL through the call: a call takes
~0.1 ms, and giving the GIL up would cost the decode thread a switch interval to take it back each
layer (docs/engine.md, "Threads and the GIL"). The whole step (`decode_layers`, milliseconds) is
called through `ctypes.CDLL`, which gives the GIL up: the event loop and the vision thread's Python
run meanwhile.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: building needs none (the image's wheel stage)
    import torch

log = logging.getLogger("casa.kernels")

SOURCE = Path(__file__).with_name("cpu_attention.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")
_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float

_lock = threading.Lock()
_lib: ctypes.PyDLL | None = None
_step: ctypes._CFuncPtr | None = None  # casa_decode_layers, called without the GIL
_tried = False


def cache_dir() -> Path:
    env = os.environ.get("CASA_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "casa-live" / "kernels"


def cpu_supported() -> bool:
    """x86-64 with AVX2 and FMA (torch's own dispatch reports AVX2 or AVX512 only with both)."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build(cc: str | None = None, into: Path | None = None) -> Path:
    """Compile the kernel into the cache (if it is not there yet); returns the shared object."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = (into or cache_dir()) / f"cpu_attention-{key}.so"
    if out.exists():
        return out
    cc = cc or os.environ.get("CC") or "cc"
    out.parent.mkdir(parents=True, exist_ok=True)
    # built under a temporary name and renamed: two processes starting at once never load half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run(
            [cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, check=True
        )
        os.chmod(tmp, 0o755)  # mkstemp makes it 0600: another user (the image's server) must load it
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library() -> ctypes.PyDLL | None:
    """The loaded kernel, built on the first call; None where it cannot run (then logged once)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("CASA_CPU_KERNELS", "1").lower() in ("0", "off", "false", "no"):
            log.info("CPU kernels disabled (CASA_CPU_KERNELS): the decode attention runs in torch")
            return None
        if not cpu_supported():
            log.info("no AVX2/FMA on this CPU: the decode attention runs in torch")
            return None
        try:
            path = str(build())
            lib = ctypes.PyDLL(path)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = e.stderr if isinstance(e, subprocess.CalledProcessError) else e
            log.warning("could not build the CPU decode attention kernel (%s): it runs in torch", detail)
            return None
        fn = lib.casa_ragged_decode_attention
        fn.restype = _INT
        fn.argtypes = [_P, _I64, _P, _P, _I64, _I64, _P, _P, _P, _P, _P, _INT, _INT, _INT, _INT, _F, _I64, _I64]  # fmt: skip
        # the whole step (milliseconds) gives the GIL up, unlike the attention op: the event loop
        # and the vision thread's Python run meanwhile, and taking it back once a step is nothing
        global _step
        _step = ctypes.CDLL(path).casa_decode_layers
        _step.restype = _INT
        _step.argtypes = [_P, _P, _P, _P, _P, _P, _I64, _P, _P, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _F, _F]  # fmt: skip
        _lib = lib
        return _lib


def supports(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors: fp32 on the CPU, head size a multiple of 8, slots
    contiguous within a head."""
    import torch

    D = q.shape[-1]
    return (
        q.device.type == "cpu"
        and q.dtype == keys.dtype == torch.float32
        and D % 8 == 0
        and keys.stride(-1) == 1
        and keys.stride(-2) == D
    )


def ragged_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    a_end: torch.Tensor,
    b_start: torch.Tensor,
    b_end: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The C kernel (`library()` must not be None; `supports(q, keys)`): see
    kernels/reference.py `ragged_decode_attention_torch` for the contract."""
    import torch

    lib = library()
    assert lib is not None
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    Hkv = keys.shape[1]
    q = q.reshape(B, H, D)  # one query per entry: (B, H, 1, D) or (B, H, D)
    if q.stride(-1) != 1 or q.stride(1) != D:
        q = q.contiguous()
    assert values.stride() == keys.stride(), "keys and values share one layout"
    idx = [
        t.contiguous() if t.dtype == torch.int64 else t.long().contiguous()
        for t in (rows, a_end, b_start, b_end)
    ]
    out = torch.empty(B, H * D, dtype=q.dtype)
    if B == 0:
        return out
    rc = lib.casa_ragged_decode_attention(
        q.data_ptr(), q.stride(0), keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1),
        *(t.data_ptr() for t in idx), out.data_ptr(), B, H, Hkv, D, scale, keys.shape[2], keys.shape[0],
    )  # fmt: skip
    if rc == -2:
        raise IndexError(f"decode attention: a row is outside the cache's {keys.shape[0]} rows")
    if rc != 0:
        raise MemoryError("the CPU decode attention kernel could not allocate its score buffer")
    return out


if __name__ == "__main__":  # python kernels/cpu_attention.py DIR: build into DIR (the image does)
    print(build(into=Path(sys.argv[1])))


# decode_layers: the weights of each layer, in the C file's order (LAYER_PTRS)
LAYER_FIELDS = (
    "ln1", "qkv_w", "qkv_b", "o_w", "o_b", "ln2", "gu_w", "gu_b", "dn_w", "dn_b",
    "c_norm", "c_qkv_w", "c_qkv_b", "c_o_w", "c_o_b",
)  # fmt: skip


# the projections, which the kernel reads transposed: (in, out), a column strip at a time
TRANSPOSED = ("qkv_w", "o_w", "gu_w", "dn_w", "c_qkv_w", "c_o_w")


class LayerWeights:
    """The pointer table `decode_layers` reads (LAYER_FIELDS per layer, NULL where absent), built
    from model/decode.py's FusedWeights; it keeps the tensors it points into alive. The
    projections are transposed copies, made once (the model's weights are not expected to change
    under a serving engine); norms and biases are read in place."""

    def __init__(self, fused: object) -> None:
        import torch

        casa_of: list[int] = list(fused.casa_of)  # type: ignore[attr-defined]
        self.keep: list[torch.Tensor] = []
        ptrs: list[int] = []
        for li, ci in enumerate(casa_of):
            for name in LAYER_FIELDS:
                per_layer = not name.startswith("c_")
                seq = getattr(fused, name)
                t = seq[li] if per_layer else (seq[ci] if ci >= 0 else None)
                if t is not None:
                    t = (t.detach().t() if name in TRANSPOSED else t.detach()).contiguous()
                    self.keep.append(t)
                ptrs.append(0 if t is None else t.data_ptr())
        self.table = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self.casa_of = torch.tensor(casa_of, dtype=torch.long)

    def fits(self, hidden: int, mlp: int, head_dim: int) -> bool:
        """Every inner dimension a multiple of 8 (the kernel's vectors) and every weight fp32."""
        import torch

        return all(n % 8 == 0 for n in (hidden, mlp, head_dim)) and all(
            t.dtype == torch.float32 and t.device.type == "cpu" for t in self.keep
        )


def decode_layers(
    x: torch.Tensor,
    weights: LayerWeights,
    dims: tuple[int, int, int, int, int, int, int, int, int],
    text_k: torch.Tensor,
    text_v: torch.Tensor,
    ca_k: torch.Tensor | None,
    ca_v: torch.Tensor | None,
    rows: torch.Tensor,
    sa_slot: torch.Tensor,
    ca_slot: torch.Tensor,
    n_img: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    eps: float,
    scale: float,
) -> torch.Tensor:
    """Every layer of the fused decode step in one C call (model/decode.py `_fused_layers`, the
    same math): x (B, hidden) embeddings -> hidden states before the final norm, in place; the
    rows' K/V written into the caches. dims: (B, hidden, layers, heads, kv heads, head dim, mlp,
    image tokens, cache rows); tables: RoPE cos / signed sin of the text and window positions,
    (B, head dim) each."""
    import torch

    lib = library()
    assert lib is not None and x.is_contiguous() and x.dtype == torch.float32
    for t in (text_k, text_v, *(() if ca_k is None else (ca_k, ca_v))):
        assert t is not None and t.is_contiguous() and t.dtype == torch.float32
    idx = [t.long().contiguous() for t in (rows, sa_slot, ca_slot, n_img)]
    cos_sin = [t.float().contiguous() for t in tables]
    dims_t = torch.tensor(dims, dtype=torch.long)
    assert _step is not None
    rc = _step(
        x.data_ptr(), dims_t.data_ptr(), weights.table, weights.casa_of.data_ptr(),
        text_k.data_ptr(), text_v.data_ptr(), text_k.shape[3],
        None if ca_k is None else ca_k.data_ptr(), None if ca_v is None else ca_v.data_ptr(),
        0 if ca_k is None else ca_k.shape[3],
        *(t.data_ptr() for t in idx), *(t.data_ptr() for t in cos_sin), eps, scale,
    )  # fmt: skip
    if rc == -2:
        raise IndexError("decode layers: a row or slot is outside the caches")
    if rc != 0:
        raise MemoryError("the CPU decode kernel could not allocate its buffers")
    return x
