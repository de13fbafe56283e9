"""The GPU test step of ``gpu_check``: only the tests a GPU adds something to, with a counted
compile budget.

Every kernel test also runs on CPU under the Triton interpreter, so on the GPU only compiled
behaviour is new: the kernels compiled for the device (each distinct compiled variant costs
~0.3-0.5 s of Triton compile on a cold cache), the CUDA channel-gather op and the layer's CUDA
path. :data:`SELECTION` picks a set covering every kernel, path (single-pass, chunked), tile kind
(flat, image, split), dtype and layout, the in-kernel running statistics and the custom ops, at
:data:`COMPILE_BUDGET` compiled variants at most -- instead of the ~1,100 variants of the whole
kernel test suite. The count is checked on CPU (``tests/benchmarks/test_gpu_check.py`` runs
``--count``): every launch of the selection is recorded under the interpreter and turned into the
key Triton compiles a variant for (``rnip_ext.kernels._variants.variant_key``).

    RNIP_TEST_DEVICE=cuda python benchmarks/gpu_tests.py   # gpu_check's tests step
    python benchmarks/gpu_tests.py --count                  # CPU: run it, count compiled variants

Extra arguments go to pytest.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# pytest node ids, relative to the repository root.
SELECTION = [
    # Every kernel, path and tile kind once per dtype and layout, against the float64 reference.
    "tests/kernels/test_bounded_bn_kernels.py::test_compiled_paths",
    "tests/kernels/test_bounded_bn_kernels.py::test_empty_batch",
    "tests/kernels/test_bounded_bn_kernels.py::test_backward_is_deterministic",
    # The custom ops on CUDA tensors: values, running statistics, torch.compile(fullgraph=True).
    "tests/ops/test_bounded_bn_ops.py::test_train_matches_reference",
    "tests/ops/test_bounded_bn_ops.py::test_train_update_matches_batchnorm_running_statistics",
    "tests/ops/test_bounded_bn_ops.py::test_compile_fullgraph",
    # The layer's CUDA path: eager equivalence, the fused penalty, launches per step, capture.
    "tests/nn/test_bounded_batchnorm_triton.py::test_training_and_eval_match_the_eager_layer",
    "tests/nn/test_bounded_batchnorm_triton.py::test_fused_penalty_gradient_with_a_real_grad_scaler",
    "tests/nn/test_bounded_batchnorm_triton.py::test_torch_compile_fullgraph_gives_the_same_results",
    "tests/nn/test_bounded_batchnorm_triton.py::test_training_step_captures_in_a_cuda_graph",
    "tests/nn/test_bounded_batchnorm_launches.py",
    # The sync pieces as ops; the CUDA channel-gather kernel.
    "tests/ops/test_bounded_bn_ops.py::test_sync_pieces_opcheck_and_match_the_reference",
    "tests/ops/test_channel_gather.py::TestCUDA",
]
# Compiled variants the selection may need (counted on CPU, see the module docstring), and the
# seconds its tests take on a GPU once compiled (small shapes; the CUDA gather tests dominate).
COMPILE_BUDGET = 190
RUN_S = 30.0


class CompileCounter:
    """A pytest plugin recording the distinct compiled variants the session launches."""

    def __init__(self, per_test: bool = False) -> None:
        self.keys: set = set()
        self.per_test = per_test
        self.new_by_test: dict[str, int] = {}
        self._current = None
        self._context = None

    def pytest_sessionstart(self, session) -> None:
        from rnip_ext.kernels._variants import internals_supported, recorded_launches

        if not internals_supported():
            return
        self._context = recorded_launches(run=True)
        self._launches = self._context.__enter__()

    def pytest_runtest_logreport(self, report) -> None:
        if report.when != "teardown" or self._context is None:
            return
        from rnip_ext.kernels._variants import variant_key

        before = len(self.keys)
        for kernel, args, kwargs in self._launches:
            self.keys.add(variant_key(kernel, args, kwargs))
        self._launches.clear()
        if len(self.keys) > before:
            self.new_by_test[report.nodeid] = len(self.keys) - before

    def pytest_sessionfinish(self, session) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self._context is None:
            terminalreporter.write_line("compiled variants: not counted (Triton internals older than 3.6)")
            return
        if self.per_test:
            for nodeid, new in sorted(self.new_by_test.items(), key=lambda kv: -kv[1]):
                terminalreporter.write_line(f"  +{new:4d}  {nodeid}")
        terminalreporter.write_line(f"compiled variants: {len(self.keys)} (budget {COMPILE_BUDGET})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", action="store_true",
                        help="CPU: run the selection under the Triton interpreter and count its compiled "
                             "variants; exit 3 when over COMPILE_BUDGET")  # fmt: skip
    parser.add_argument("--per-test", action="store_true", help="list the new variants each test adds")
    parser.add_argument("--workers", type=int, default=0, help="pytest-xdist workers (GPU run; 0: none)")
    args, extra = parser.parse_known_args(argv)
    if args.count:
        os.environ["RNIP_TEST_DEVICE"] = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
    os.chdir(ROOT)
    import importlib.util

    import pytest

    pytest_args = ["-q", "-p", "no:cacheprovider", "--maxfail=25", *SELECTION, *extra]
    plugins = []
    counter = None
    if args.workers > 0 and not args.count and importlib.util.find_spec("xdist") is not None:
        pytest_args += ["-n", str(args.workers)]  # tests, not files, spread: the compiles too
    else:  # one process (xdist workers would each count their own share)
        if args.workers > 0 and not args.count:
            print("pytest-xdist is not installed: the tests run in one process", flush=True)
        counter = CompileCounter(per_test=args.per_test)
        plugins.append(counter)
    status = int(pytest.main(pytest_args, plugins=plugins))
    if args.count and counter is not None and counter._context is not None and len(counter.keys) > COMPILE_BUDGET:
        print(f"error: the GPU test selection needs {len(counter.keys)} compiled variants, over its budget "
              f"of {COMPILE_BUDGET}", file=sys.stderr)  # fmt: skip
        return 3
    return status


if __name__ == "__main__":
    sys.exit(main())
