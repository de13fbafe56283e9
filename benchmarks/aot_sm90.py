"""Ahead-of-time compile of every kernel configuration the launchers choose, for an sm_90 GPU.

No GPU needed. For each layer shape of the paper's CIFAR VGG-16 (batch 128) and ResNet-50
(batch 64), plus ResNet-50's 7x7 at batch 256 (the chunked path with odd ``H*W``), each dtype (fp32, bf16, fp16) and layout (NCHW, channels_last), the real launchers
run a training step (forward, backward) and an eval forward on ``meta`` tensors with every
kernel's launch intercepted: the arguments they would pass give the exact compile key (constexpr
tiles and flags, ``num_warps``, and Triton's own specialisation of the other arguments, honouring
``do_not_specialize``), with the chunking planned for an H200 (132 SMs). Each distinct key is
compiled for ``GPUTarget("cuda", 90, 32)`` and ``ptxas -v`` (the one Triton ships, Triton's own
flags) reports registers, spill bytes and shared memory; the PTX gives the number of global
load/store instructions that are vectorised (``.v2``/``.v4``) or scalar.

    python benchmarks/aot_sm90.py                   # all shapes -> benchmarks/results/aot_sm90.json
    python benchmarks/aot_sm90.py --subset --out x  # the representative subset CI compiles

Exit status 1 when any kernel spills registers (the JSON is written either way).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

import torch  # noqa: E402

from rnip_ext.kernels._variants import specialisation, step_launches  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VGG16_CIFAR_B128 = [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8), (128, 512, 4, 4), (128, 512, 2, 2)]
RESNET50_B64 = [
    (64, 64, 112, 112), (64, 64, 56, 56), (64, 256, 56, 56), (64, 128, 56, 56), (64, 128, 28, 28),
    (64, 512, 28, 28), (64, 256, 28, 28), (64, 256, 14, 14), (64, 1024, 14, 14), (64, 512, 14, 14),
    (64, 512, 7, 7), (64, 2048, 7, 7),
]  # fmt: skip
# ResNet-50's 7x7 layers at batch 256 take the chunked path (N*H*W = 12544 > 8192): the only way
# the launchers reach the chunked kernels' split tiles (odd H*W), so they are recorded too.
CHUNKED_ODD_HW = [(256, 512, 7, 7)]
SUBSET = [(128, 512, 4, 4), (128, 256, 8, 8), (128, 64, 32, 32), (64, 2048, 7, 7), (64, 256, 14, 14)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET = ("cuda", 90, 32)


def _specialisation(kernel, args, kwargs):
    """``(signature, constexprs, attrs, num_warps)`` exactly as a launch with these arguments."""
    params, num_warps = specialisation(kernel, args, kwargs)
    sig, consts, attrs = {}, {}, {}
    for i, (name, ty, key) in enumerate(params):
        sig[name] = ty
        if ty == "constexpr":
            consts[name] = key
        elif key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs, 4 if num_warps is None else num_warps


def collect(shapes, dtypes, layouts):
    """``{key: record}`` of every distinct launch the launchers make for these cases: a training
    step as the layer runs it (momentum 0.1, the fused penalty) and an eval forward, planned on
    ``meta`` tensors for an H200's 132 SMs (``_variants.step_launches``)."""
    found = {}
    for shape in shapes:
        for dname in dtypes:
            for layout in layouts:
                launches = step_launches(shape, DTYPES[dname], layout == "channels_last", ("fwdbwd", "eval"))
                for kernel, args, kwargs in launches:
                    sig, consts, attrs, warps = _specialisation(kernel, args, kwargs)
                    key = json.dumps([kernel.fn.__name__, sig, {k: str(v) for k, v in consts.items()},
                                      sorted(str(k) for k in attrs), warps], sort_keys=True)  # fmt: skip
                    record = found.setdefault(key, {
                        "kernel": kernel.fn.__name__, "num_warps": warps,
                        "constexprs": {k: str(v) for k, v in consts.items()
                                       if sig.get(k) == "constexpr"},
                        "cases": [], "_build": (kernel, sig, consts, attrs, warps),
                    })  # fmt: skip
                    record["cases"].append(f"{'x'.join(map(str, shape))} {dname} {layout}")
    return found


def _ptxas_report(ptx: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(TARGET[1]).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
                               src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True, check=True)  # fmt: skip
    log = done.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_store_bytes": int(spill.group(1)) if spill else 0,
        "spill_load_bytes": int(spill.group(2)) if spill else 0,
        "stack_frame_bytes": int(stack.group(1)) if stack else 0,
    }


def _memory_ops(ptx: str) -> dict:
    """Global loads/stores in the PTX, vectorised (``.v2``/``.v4``) or scalar (instructions,
    not executions: a tile loop's body counts once)."""
    counts = {}
    for op in ("ld", "st"):
        ins = re.findall(rf"\b{op}\.global[\w.]*", ptx)
        vec = sum(1 for i in ins if ".v2" in i or ".v4" in i)
        counts[f"{op}_global_vector"] = vec
        counts[f"{op}_global_scalar"] = len(ins) - vec
    return counts


def compile_all(found) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for record in found.values():
        kernel, sig, consts, attrs, warps = record.pop("_build")
        src = ASTSource(kernel, sig, consts, attrs)
        compiled = triton.compile(src, target=GPUTarget(*TARGET), options={"num_warps": warps})
        record.update(_ptxas_report(compiled.asm["ptx"]))
        record.update(_memory_ops(compiled.asm["ptx"]))
        record["shared_memory_bytes"] = compiled.metadata.shared
        rows.append(record)
    rows.sort(key=lambda r: (r["kernel"], json.dumps(r["constexprs"], sort_keys=True), r["num_warps"]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", action="store_true", help=f"only {len(SUBSET)} representative shapes")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/aot_sm90.json)")
    args = parser.parse_args(argv)
    shapes = SUBSET if args.subset else VGG16_CIFAR_B128 + RESNET50_B64 + CHUNKED_ODD_HW
    found = collect(shapes, args.dtypes, ["nchw", "channels_last"])
    rows = compile_all(found)
    import triton

    payload = {
        "target": {"backend": TARGET[0], "arch": TARGET[1], "warp_size": TARGET[2]},
        "triton": triton.__version__, "torch": torch.__version__,
        "shapes": [list(s) for s in shapes], "dtypes": args.dtypes, "layouts": ["nchw", "channels_last"],
        "kernels": rows,
    }  # fmt: skip
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "aot_sm90.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(tmp, out)
    spills = [r for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    for r in rows:
        print(f"{r['kernel']:32s} warps={r['num_warps']:2d} regs={r['registers']:3d} "
              f"spill={r['spill_store_bytes']}/{r['spill_load_bytes']} smem={r['shared_memory_bytes']:6d} "
              f"ld v/s={r['ld_global_vector']}/{r['ld_global_scalar']} "
              f"{r['constexprs']}")  # fmt: skip
    print(f"{len(rows)} configurations, {len(spills)} with spills; wrote {out}")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
