"""Every kernel compiles ahead of time for an H100 (sm_90) on this CPU-only machine.

The interpreter accepts programs that the GPU compiler rejects (a dot with K < 16, a layout that
does not lower), so this test runs the real compiler (`kernels/aot.py`: triton.compile to a cubin
for GPUTarget("cuda", 90, 32), then the cuobjdump bundled with triton for registers, spills, shared
memory and the tensor-core instructions in the SASS). It runs in a subprocess because interpreted
kernels (TRITON_INTERPRET=1, set for the rest of the suite) cannot be compiled.

Run `python -m casa_live.kernels.aot` for the table; `pytest -s` prints it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # the real sm_90 compile of every kernel: ~20 s on the 2-core box

ROOT = Path(__file__).resolve().parents[1]
H100_SMEM = 227 * 1024  # max dynamic shared memory per block on sm_90


def _toolchain_missing() -> str | None:
    nv = Path(triton.__file__).parent / "backends" / "nvidia"
    for tool in ("ptxas", "cuobjdump"):
        if not (nv / "bin" / tool).exists():
            return f"triton {triton.__version__} wheel has no bundled {tool}: cannot build a cubin here"
    return None


@pytest.fixture(scope="module")
def report() -> list[dict]:
    reason = _toolchain_missing()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence the 3.9 default-change warning
    proc = subprocess.run(
        [sys.executable, "-m", "casa_live.kernels.aot", "--arch", "90", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.stdout.strip(), f"kernels.aot printed nothing; stderr:\n{proc.stderr[-3000:]}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nsm_90 AOT compile (triton {triton.__version__}):")
    print(f"{'kernel':44} {'warps':>5} {'regs':>5} {'spill':>6} {'smem':>7} mma")
    for r in rows:
        print(
            f"{r['name']:44} {r['num_warps']:5} {r['registers']:5} {r['spill_bytes']:6} "
            f"{r['shared_bytes']:7} {r['mma'] if r['ok'] else 'FAILED: ' + r['error']}"
        )
    return rows


def test_every_kernel_compiles_for_sm90(report):
    failed = [f"{r['name']}: {r['error']}" for r in report if not r["ok"]]
    assert not failed, "GPU compile failed:\n" + "\n".join(failed)
    names = {r["name"].split("_")[0] for r in report}
    assert {"attn", "merge", "rmsnorm", "rope"} <= names


def test_no_spills_and_shared_memory_fits(report):
    for r in report:
        assert r["spill_bytes"] == 0, (
            f"{r['name']} spills {r['spill_bytes']} B/thread ({r['registers']} regs)"
        )
        assert r["shared_bytes"] <= H100_SMEM, f"{r['name']} needs {r['shared_bytes']} B of shared memory"


def test_attention_uses_tensor_cores(report):
    """16-bit attention tiles become MMA instructions; >= 64-row prefill tiles become wgmma (HGMMA)."""
    for r in report:
        if r["name"].startswith("attn_") and "fp32" not in r["name"]:
            assert r["mma"] in ("HMMA", "HGMMA"), f"{r['name']}: no tensor-core instruction"
            rows = int(r["name"].rsplit("_m", 1)[1])
            if rows >= 64:
                assert r["mma"] == "HGMMA", f"{r['name']}: expected wgmma for a {rows}-row tile"
