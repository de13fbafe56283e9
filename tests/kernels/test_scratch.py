"""The chunked launchers' cached scratch (``rnip_ext.kernels._scratch``).

What must hold: a repeated layout takes its scratch from the cache (no allocation); two threads
or two streams never share a buffer; results are bitwise those of fresh allocations even when the
cache holds stale (NaN) values; launch arguments (hence compiled variants and the AOT record) do
not change; nothing returned or saved for backward aliases the cache; CUDA graph capture gets
fresh buffers. On CPU the kernels run under the Triton interpreter (tiny tiles, small shapes);
the planner checks use ``meta`` tensors; the stream and capture checks need a GPU.
"""

import threading

import pytest
import torch

from rnip_ext._backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

META = torch.device("meta")
CPU = torch.device("cpu")
EPS, SHIFT = 1e-5, 0.4


@pytest.fixture(autouse=True)
def clean_cache(monkeypatch):
    from rnip_ext.kernels import _scratch

    monkeypatch.setattr(_scratch, "ENABLED", True)
    _scratch.release_scratch()
    yield
    _scratch.release_scratch()


def _tiny():
    from rnip_ext.kernels._config import BNConfig

    # Several chunks and channel blocks on small shapes (as in test_bounded_bn_kernels).
    return BNConfig(block_c=2, block_m=8, red_block_m=4, chunk_tiles=3, comb_block_c=2, comb_block_k=2)


def _few():
    from rnip_ext.kernels._config import BNConfig

    # Still chunked (a few chunks, two channel blocks), with fewer programs for the interpreter.
    return BNConfig(block_c=4, block_m=16, red_block_m=8, chunk_tiles=1, comb_block_c=4, comb_block_k=4)


def _inputs(shape, channels_last=False, device=CPU, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    c = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(c, generator=gen)
    g = torch.randn(c, generator=gen)
    return [t.to(device) for t in (x, dy, w, g)]


def _step(x, dy, w, g, config):
    """A chunked training step (running statistics, fused penalty, all gradients): every tensor it
    returns or updates."""
    from rnip_ext.kernels import bn_train

    c = x.shape[1]
    running = (torch.zeros(c, device=x.device), torch.ones(c, device=x.device))
    nbt = torch.zeros((), dtype=torch.long, device=x.device)
    y, mean, var, pen = bn_train.train_forward(x, w, None, EPS, SHIFT, True, running=running, momentum=None,
                                               num_batches_tracked=nbt, config=config)  # fmt: skip
    dx, dw, db = bn_train.train_backward(dy, x, mean, var, w, g, EPS, SHIFT, True, (True, True, True), config=config)
    return y, mean, var, pen, dx, dw, db, *running, nbt


def _poison_cache():
    from rnip_ext.kernels import _scratch

    for buf in _scratch.slot_buffers():
        buf.fill_(float("nan"))


def _storages(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def test_repeated_layouts_hit_the_cache_and_allocate_no_scratch(monkeypatch):
    from rnip_ext.kernels import _scratch
    from rnip_ext.kernels._variants import recorded_launches

    misses = []
    carve = _scratch._carve
    monkeypatch.setattr(_scratch, "_carve", lambda key: misses.append(key[4:]) or carve(key))
    x = torch.empty((16, 32, 24, 24), device=META)
    w, g = torch.empty(32, device=META), torch.empty((), device=META).expand(32)
    steps = []
    for _ in range(3):
        with recorded_launches(run=False) as launches:
            _step(x, x, w, g, None)
        steps.append(launches)
    assert len(steps[0]) == 6  # stats partials + combine, normalise, sums partials + combine, dx
    assert len(misses) == 2  # the first step: the statistics' and the backward's scratch, once each
    # Later steps pass the very same scratch tensors (the partials, pivot, sums rows).
    scratch_args = [(i, j) for i, (_, args, _) in enumerate(steps[1]) for j, a in enumerate(args)
                    if isinstance(a, torch.Tensor) and any(a is b for b in steps[2][i][1])]  # fmt: skip
    assert len(scratch_args) >= 10
    # Another channel count misses (and may grow the buffer, which re-carves the first layout's
    # views once); after that round both layouts hit.
    other = torch.empty((16, 48, 24, 24), device=META)
    rounds = []
    for _ in range(2):
        with recorded_launches(run=False):
            _step(other, other, torch.empty(48, device=META), torch.empty((), device=META).expand(48), None)
            _step(x, x, w, g, None)
        rounds.append(len(misses))
    assert 4 <= rounds[0] <= 6 and rounds[1] == rounds[0]
    _scratch.release_scratch()
    assert _scratch.slot_buffers() == []


@pytest.mark.parametrize("shape,channels_last,dtype", [
    ((16, 32, 24, 24), False, torch.float32), ((16, 32, 24, 24), True, torch.float16),
    ((8, 24, 7, 7), False, torch.bfloat16), ((64, 33, 14, 14), False, torch.float64),
    ((128, 64, 32, 32), True, torch.float32), ((0, 16, 8, 8), False, torch.float32),
])  # fmt: skip
def test_launch_arguments_match_fresh_allocations(monkeypatch, shape, channels_last, dtype):
    """Every launch of a step, SyncBN's pieces included, compiles the same variant and gets the
    same sizes and shapes with the cache as without (the AOT record cannot change)."""
    from rnip_ext.kernels import _scratch, bn_backward, bn_stats
    from rnip_ext.kernels._variants import recorded_launches, variant_key

    c = shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype, device=META).contiguous(memory_format=fmt)
    w, g = torch.empty(c, device=META), torch.empty((), device=META).expand(c)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean = torch.empty(c, dtype=acc, device=META)

    def record():
        with recorded_launches(run=False) as launches:
            for _ in range(2):  # the second step takes the cache's views
                _step(x, x, w, g, None)
                bn_stats.batch_stats(x, w, SHIFT, True)
                bn_backward.backward_sums(x, x, mean, mean, w, g, EPS, SHIFT)
        return [(variant_key(k, a, kw), [(tuple(t.shape), t.stride(), t.dtype) if isinstance(t, torch.Tensor) else t
                                         for t in a]) for k, a, kw in launches]  # fmt: skip

    cached = record()
    monkeypatch.setattr(_scratch, "ENABLED", False)
    assert record() == cached


@pytest.mark.parametrize("shape,channels_last,tiles", [((3, 5, 4, 3), False, "tiny"), ((4, 6, 3, 3), True, "few"),
                                                       ((0, 5, 4, 3), False, "few")])  # fmt: skip
def test_results_are_bitwise_those_of_fresh_allocations(monkeypatch, shape, channels_last, tiles):
    """With a cache full of NaN (a previous call's leftovers), every output and running buffer is
    bitwise what fresh allocations give: no kernel reads scratch it did not write in that call
    (the pivot of an empty batch, which must be zero, is never cached)."""
    from rnip_ext.kernels import _scratch, bn_backward, bn_stats

    x, dy, w, g = _inputs(shape, channels_last)
    c = shape[1]
    mean = torch.randn(c, generator=torch.Generator().manual_seed(1))

    config = _tiny() if tiles == "tiny" else _few()

    def run():
        out = list(_step(x, dy, w, g, config))
        out += bn_stats.batch_stats(x, w, SHIFT, True, config=config)
        out += bn_backward.backward_sums(dy, x, mean, mean.abs(), w, g, EPS, SHIFT, config=config)
        return out

    run()  # fills the cache
    assert _scratch.slot_buffers()
    _poison_cache()
    cached = run()
    monkeypatch.setattr(_scratch, "ENABLED", False)
    fresh = run()
    assert not any(torch.isnan(t).any() for t in cached[:7])
    for a, b in zip(cached, fresh):
        assert a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)


def test_scratch_views_are_aligned_as_fresh_allocations():
    """Every cached view starts 512 bytes into the buffer's base; the sums' second row stays
    ``C`` elements after the first, as ``buf[1]`` of a fresh ``[2, C]`` buffer."""
    from rnip_ext.kernels import _scratch

    for dtype in (torch.float32, torch.float64):
        for kind, rows, c in ((_scratch.STATS, 7, 13), (_scratch.SUMS_ROWS, 5, 3), (_scratch.SUMS, 1, 1)):
            views = _scratch.take(CPU, dtype, kind, rows, c)
            flat = views if kind != _scratch.SUMS_ROWS else views[0] + views[1][:1]
            base = _scratch.slot_buffers()[-1].data_ptr()
            assert base % 16 == 0
            assert all((t.data_ptr() - base) % _scratch.ALIGN_BYTES == 0 for t in flat)
            if kind == _scratch.SUMS_ROWS:
                assert views[1][1].data_ptr() - views[1][0].data_ptr() == c * views[1][0].element_size()
            assert _scratch.take(CPU, dtype, kind, rows, c) is views  # a hit: the same tuple
            _scratch.release_scratch()


def test_threads_never_share_scratch(monkeypatch):
    """Two live threads stepping the same layout in turn each get their own buffer, and both get
    the results of fresh allocations. (Under the interpreter kernels run on the calling thread;
    the interpreter itself is not thread-safe, so the threads take turns.)"""
    from rnip_ext.kernels import _scratch

    cases = [_inputs((2, 5, 4, 3), seed=s) for s in (1, 2)]
    monkeypatch.setattr(_scratch, "ENABLED", False)
    expected = [_step(*case, _few()) for case in cases]
    monkeypatch.setattr(_scratch, "ENABLED", True)
    turn = threading.Lock()
    alive = threading.Barrier(2, timeout=120)
    got, slots, errors = {}, {}, []

    def work(i):
        try:
            alive.wait()
            for _ in range(2):
                with turn:
                    got[i] = _step(*cases[i], _few())
            mine = [flat for key, flat in list(_scratch._SLOTS.items()) if key[0] == threading.get_ident()]
            slots[i] = _storages(mine)
            alive.wait()  # neither thread ends (its id free for reuse) before both looked
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
            alive.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert slots[0] and slots[1] and not slots[0] & slots[1]
    for i in (0, 1):
        for a, b in zip(got[i], expected[i]):
            assert torch.equal(a, b)


def test_streams_and_capture_pick_the_slot(monkeypatch):
    """The key's stream: two streams get two buffers; ``None`` (capturing, another device) fresh
    buffers outside the cache."""
    from rnip_ext.kernels import _scratch

    stream = {"now": 1}
    monkeypatch.setattr(_scratch, "_stream", lambda device: stream["now"])
    a = _scratch.take(CPU, torch.float32, _scratch.STATS, 3, 4)
    stream["now"] = 2
    b = _scratch.take(CPU, torch.float32, _scratch.STATS, 3, 4)
    assert len(_scratch.slot_buffers()) == 2 and not _storages(a) & _storages(b)
    stream["now"] = None
    c = _scratch.take(CPU, torch.float32, _scratch.STATS, 3, 4)
    assert not _storages(c) & _storages(_scratch.slot_buffers()) and len(_scratch.slot_buffers()) == 2
    stream["now"] = 1
    assert _scratch.take(CPU, torch.float32, _scratch.STATS, 3, 4) is a


def test_nothing_returned_or_saved_aliases_the_cache():
    """The layer's outputs, gradients and every tensor autograd saves live outside the cache."""
    import rnip_ext
    from rnip_ext.kernels import _scratch, bn_train

    layer = rnip_ext.BoundedBatchNorm2d(3, backend="triton")
    x = torch.randn(2, 3, 72, 64, requires_grad=True)  # 9216 positions per channel: chunked
    assert not bn_train.uses_single_pass(x)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        for _ in range(2):  # the second step runs on cached scratch
            y = layer(x)
            y.backward(torch.randn_like(y))
    cache = _storages(_scratch.slot_buffers())
    assert cache
    kept = [y, x.grad, layer.running_mean, layer.running_var, *(p.grad for p in layer.parameters()), *saved]
    assert len(saved) >= 3 and not _storages(kept) & cache


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_streams_get_their_own_scratch_and_capture_fresh_buffers():
    from rnip_ext.kernels import _scratch

    dev = torch.device("cuda", torch.cuda.current_device())
    a = _scratch.take(dev, torch.float32, _scratch.SUMS, 4, 8)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        b = _scratch.take(dev, torch.float32, _scratch.SUMS, 4, 8)
        assert _scratch.take(dev, torch.float32, _scratch.SUMS, 4, 8) is b
    assert _scratch.take(dev, torch.float32, _scratch.SUMS, 4, 8) is a
    assert not _storages(a) & _storages(b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        c = _scratch.take(dev, torch.float32, _scratch.SUMS, 4, 8)
        c[0].fill_(1.0)
    assert not _storages(c) & _storages(_scratch.slot_buffers())
