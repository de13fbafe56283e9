"""A measured latency model of a network on one device: :class:`LatencyTable`.

Every layer that pruning narrows (a conv or linear layer whose input or output channels belong
to a channel group, with the group's BatchNorm right after a producer or depthwise conv) is
timed on its own, on the model's device, dtype and layout and at the example inputs' batch
size, for a grid of widths of the groups it touches: a 2-D grid (input width x output width)
for a conv between two groups, 1-D otherwise. With ``L(w)`` the sum of the timed layers at
widths ``w`` (bilinear interpolation between measured widths; linear on 1-D grids), the
predicted latency of the network is::

    T(L(w)),  T piecewise linear through the measured points (L(w_k), measured network w_k)

where the ``w_k`` are whole networks timed during the build: the unpruned one (three times,
before, half-way through and after the layers, the median counts) and one with every group
narrowed alike to each grid step below full width. The *rest* of the network (stem,
activations, pooling, residual streams, and how layers interact through the caches) is thus
measured at several sizes rather than assumed fixed: timed alone, the layers of a wide network
add up to less than the network takes (see ``docs/latency.md``). Each layer's measurements,
and the measured networks, are made monotone: a width's time is the least measured at that or
any larger width (on a loaded machine a narrower measurement can come out slower than a wider
one; the raw times stay in :attr:`LatencyTable.times` and the JSON). Whether that
interpolation is accurate is measured, not assumed: with ``check=True`` every 2-D layer is
also timed at the middle of each diagonal grid cell, and :attr:`LatencyTable.interpolation_error`
reports the relative errors (``docs/latency.md`` has the numbers; tables with a large error
should be built with more ``points``).

Timing: :class:`WallClockTimer` on CPU (``time.perf_counter``, warm-up calls, the median of
repeats), :class:`CudaEventTimer` on CUDA (CUDA events after warm-up, synchronised; written
for CUDA but not run on this project's CPU-only machines). Any callable
``timer(module, inputs) -> seconds`` can replace them (the tests use a deterministic one), and
:class:`WallClockTimer` takes a ``clock``.

The table is saved as a small JSON (:meth:`LatencyTable.save`, atomic) keyed by the device,
the torch version, threads, dtype, layout, the input shapes, every timed layer's shape and the
grid; :meth:`LatencyTable.load` with the model refuses a table measured for anything else.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .._validation import check_int
from .._machine import cpu_model
from .graph import analyse, eval_mode
from .knapsack import Selection, select_widths
from .rounding import allowed_widths, check_round_to, round_width

__all__ = ["CudaEventTimer", "LatencyTable", "TimedLayer", "WallClockTimer", "grid_widths"]

FORMAT = 1
LAYOUTS = ("contiguous", "channels_last")


class WallClockTimer:
    """Seconds per call of ``module(*inputs)`` under ``torch.no_grad``: the median over
    ``repeats`` calls after ``warmup`` untimed ones, read from ``clock`` (``time.perf_counter``)."""

    def __init__(self, warmup: int = 3, repeats: int = 9, clock: Callable[[], float] = time.perf_counter) -> None:
        if warmup < 0 or repeats < 1:
            raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
        self.warmup, self.repeats, self.clock = warmup, repeats, clock

    @torch.no_grad()
    def __call__(self, module: nn.Module, inputs: tuple) -> float:
        for _ in range(self.warmup):
            module(*inputs)
        times = []
        for _ in range(self.repeats):
            start = self.clock()
            module(*inputs)
            times.append(self.clock() - start)
        return statistics.median(times)


class CudaEventTimer:
    """Like :class:`WallClockTimer` on a CUDA device: each call between two CUDA events on the
    current stream, synchronised before reading (untested on this project's CPU-only machines)."""

    def __init__(self, warmup: int = 10, repeats: int = 25) -> None:
        if warmup < 0 or repeats < 1:
            raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
        self.warmup, self.repeats = warmup, repeats

    @torch.no_grad()
    def __call__(self, module: nn.Module, inputs: tuple) -> float:
        for _ in range(self.warmup):
            module(*inputs)
        pairs = []
        for _ in range(self.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            module(*inputs)
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3


def grid_widths(channels: int, points: int, round_to: int = 1, min_channels: int = 1) -> list[int]:
    """``points`` allowed widths (:func:`~rnip_ext.pruning.rounding.allowed_widths`) evenly
    spaced by index over the allowed ones, the narrowest and ``channels`` always included."""
    allowed = allowed_widths(channels, round_to, min_channels)
    if points >= len(allowed):
        return allowed
    return sorted({allowed[round(i * (len(allowed) - 1) / (points - 1))] for i in range(points)})


@dataclass
class TimedLayer:
    """One timed layer: a conv or linear module (``name``), with ``norm`` (a BatchNorm of its
    output's group) after it when it produces the group. ``in_group``/``out_group`` name the
    groups whose width sets its input/output channels (``None``: fixed); ``block`` is the number
    of input features per channel of a linear layer after a flatten; ``input_shape`` is its input
    at full width."""

    name: str
    kind: str
    in_group: str | None
    out_group: str | None
    in_channels: int
    out_channels: int
    block: int
    input_shape: list[int]
    norm: str | None
    spec: str  # the module's repr: kernel, stride, padding, bias...

    @property
    def depthwise(self) -> bool:
        return self.in_group is not None and self.in_group == self.out_group


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def _narrow(module: nn.Module, n_in: int | None, n_out: int | None, block: int = 1) -> nn.Module:
    """A copy of a conv/linear/BatchNorm module keeping its first ``n_in`` input and ``n_out``
    output channels (``None``: all); the weights are the first ones, which is all timing needs."""
    m = copy.deepcopy(module)
    with torch.no_grad():
        if isinstance(m, nn.Conv2d):
            depthwise = m.groups > 1
            out = n_out or m.out_channels
            cin = n_in or m.in_channels
            m.weight = nn.Parameter(m.weight[:out, : (1 if depthwise else cin)].clone())
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias[:out].clone())
            m.out_channels, m.in_channels = out, (out if depthwise else cin)
            if depthwise:
                m.groups = out
        elif isinstance(m, nn.Linear):
            out = n_out or m.out_features
            fin = (n_in or m.in_features // block) * block
            m.weight = nn.Parameter(m.weight[:out, :fin].clone())
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias[:out].clone())
            m.out_features, m.in_features = out, fin
        else:  # a BatchNorm: every per-channel tensor is cut
            n = n_out
            for key, value in list(m._parameters.items()):
                if value is not None and value.dim() == 1:
                    m._parameters[key] = nn.Parameter(value[:n].clone())
            for key, value in list(m._buffers.items()):
                if value is not None and value.dim() == 1:
                    m._buffers[key] = value[:n].clone()
            m.num_features = n
    return m


def _layers(model: nn.Module, example_inputs,
            residual_streams: bool = False) -> tuple[dict[str, int], list[TimedLayer]]:
    """The channel groups' widths and every layer pruning narrows, from one traced forward."""
    groups, gm = analyse(model, example_inputs, residual_streams)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no prunable channel group: there is nothing to time")
    modules = dict(model.named_modules())
    inputs = {n.target: tuple(n.args[0].meta["tensor_meta"].shape) for n in gm.graph.nodes
              if n.op == "call_module" and n.args and isinstance(n.args[0], torch.fx.Node)
              and "tensor_meta" in n.args[0].meta}
    layers: dict[str, dict] = {}

    def entry(name: str) -> dict:
        return layers.setdefault(name, {"in_group": None, "out_group": None, "block": 1, "norm": None})

    for g in groups:
        for producer in g.producers:
            e = entry(producer)
            e["out_group"], e["norm"] = g.name, g.bns[0]
        for dw, bn in zip(g.depthwise, g.bns[1:]):
            e = entry(dw)
            e["in_group"] = e["out_group"] = g.name
            e["norm"] = bn
        for c in g.consumers:
            if c.width is not None:
                continue  # reads a concatenation of several groups: timed at its full input width
            e = entry(c.name)
            e["in_group"], e["block"] = g.name, c.block
    result = []
    for name, e in layers.items():  # in graph order: dicts keep insertion order, groups are in graph order
        m = modules[name]
        if e["in_group"] is not None and e["in_group"] == e["out_group"] and name not in {
                d for g in groups for d in g.depthwise}:
            # A conv reading a residual stream and writing into the same one (RepVGG): its time
            # varies with the square of one width, which the table's 1-D/2-D grids do not model.
            raise ValueError(f"layer {name!r} reads and writes the same channel group {e['in_group']!r} (a RepVGG "
                             "block with residual_streams=True): latency tables do not support that yet; plan "
                             "to target_flops/target_params instead")
        linear = isinstance(m, nn.Linear)
        result.append(TimedLayer(
            name=name, kind="linear" if linear else "conv", in_group=e["in_group"], out_group=e["out_group"],
            in_channels=(m.in_features // e["block"]) if linear else m.in_channels,
            out_channels=m.out_features if linear else m.out_channels, block=e["block"],
            input_shape=list(inputs[name]), norm=e["norm"], spec=repr(m)))
    return {g.name: g.channels for g in groups}, result


def _model_setting(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next((t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.get_default_dtype())


def _as_tuple(example_inputs) -> tuple:
    if example_inputs is None:
        raise ValueError("example_inputs is required: the latency is measured at their shape (batch size included)")
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _key(model: nn.Module, inputs: tuple, layout: str, channels: dict, layers: list[TimedLayer],
         residual_streams: bool = False) -> dict:
    """What a table is valid for: compared field by field on load (``residual_streams`` only
    when set, so that tables measured before the option existed still load)."""
    device, dtype = _model_setting(model)
    streams = {"residual_streams": True} if residual_streams else {}
    return {**streams,
        "format": FORMAT, "device": _device_name(device), "device_type": device.type, "torch": torch.__version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else None, "dtype": str(dtype).replace("torch.", ""),
        "layout": layout, "inputs": [list(x.shape) for x in inputs], "model": type(model).__name__,
        "groups": dict(channels), "layers": [asdict(layer) for layer in layers],
    }


def _interp(xs: list[int], x: float) -> tuple[int, int, float]:
    """Grid cell ``(i, j, t)`` with ``x = (1 - t) xs[i] + t xs[j]``; ``x`` must lie within ``xs``."""
    if x < xs[0] or x > xs[-1]:
        raise ValueError(f"width {x} is outside the measured widths {xs[0]}..{xs[-1]}")
    j = bisect.bisect_left(xs, x)
    if xs[j] == x:
        return j, j, 0.0
    return j - 1, j, (x - xs[j - 1]) / (xs[j] - xs[j - 1])


class LatencyTable:
    """Measured latency of a network's prunable layers at candidate widths on one device.

    Build with :meth:`build` (or :meth:`load` a saved one), then :meth:`predict` the latency in
    seconds of any widths ``{group name: kept channels}``; :attr:`full` is the measured
    latency of the unpruned network. See the module docstring for what is timed.
    """

    def __init__(self, key: dict, grid: dict[str, list[int]], times: dict[str, list], full: float,
                 settings: dict, check: list[dict] | None = None, networks: list[dict] | None = None) -> None:
        self.key, self.grid, self.times, self.full = key, grid, times, float(full)
        self.settings, self.check, self.networks = settings, check or [], networks or []
        self.layers = [TimedLayer(**layer) for layer in key["layers"]]
        self.channels = dict(key["groups"])
        # Whether the groups couple residual streams (tables before the option: no, the default).
        self.residual_streams = bool(key.get("residual_streams", False))
        self._monotone = {name: _monotone(t) for name, t in times.items()}
        # (sum of the timed layers, measured whole network): the full one and the narrowed ones,
        # made monotone like the layers (a network whose layers take less is not slower).
        points = sorted([(self.layers_time(self.channels), self.full)]
                        + [(self.layers_time(n["widths"]), n["measured"]) for n in self.networks])
        low = math.inf
        for i in reversed(range(len(points))):
            low = min(low, points[i][1])
            points[i] = (points[i][0], low)
        self._calibration = points
        self.rest = self.full - self.layers_time(self.channels)

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, example_inputs, *, points: int = 5, round_to: int | None = None,
              min_channels: int = 3, layout: str = "contiguous", timer: Callable | None = None,
              check: bool = True, progress: bool = True, residual_streams: bool = False) -> "LatencyTable":
        """Time ``model`` (in eval mode) on its device and dtype at the shape of
        ``example_inputs``: the whole network once, every narrowed layer at ``points`` widths
        per group (:func:`grid_widths` with ``round_to`` and ``min_channels``, as the planner
        will use them) and, with ``check``, at the middle of each diagonal grid cell.
        ``layout``: ``"contiguous"`` or ``"channels_last"`` (model and inputs converted for
        timing). ``timer(module, inputs) -> seconds`` defaults to :class:`CudaEventTimer` on
        CUDA, :class:`WallClockTimer` elsewhere. ``residual_streams``: time the groups of
        :func:`rnip_ext.pruning.plan` with ``residual_streams=True`` (each residual stream one
        group; recorded in the table's key)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"LatencyTable.build expects an nn.Module, got {type(model).__name__}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        check_int("points", points, 2)
        round_to = check_round_to(round_to)
        inputs = _as_tuple(example_inputs)
        channels, layers = _layers(model, inputs, residual_streams)
        device, dtype = _model_setting(model)
        if timer is None:
            timer = CudaEventTimer() if device.type == "cuda" else WallClockTimer()
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        grid = {g: grid_widths(c, points, round_to, min_channels) for g, c in channels.items()}
        modules = dict(model.named_modules())

        def widths_of(layer: TimedLayer, group: str | None, full: int) -> list[int]:
            return grid[group] if group is not None else [full]

        jobs = []  # (layer, in width, out width, where the time goes)
        for layer in layers:
            ins = widths_of(layer, layer.in_group, layer.in_channels)
            outs = widths_of(layer, layer.out_group, layer.out_channels)
            if layer.depthwise:
                jobs += [(layer, w, w, ("grid", i)) for i, w in enumerate(ins)]
            else:
                jobs += [(layer, a, b, ("grid", i, j)) for i, a in enumerate(ins) for j, b in enumerate(outs)]
            if check and len(ins) > 1 and len(outs) > 1 and not layer.depthwise:
                for i in range(min(len(ins), len(outs)) - 1):
                    a, b = (ins[i] + ins[i + 1]) // 2, (outs[i] + outs[i + 1]) // 2
                    if a not in ins and b not in outs:
                        jobs.append((layer, a, b, ("check",)))

        from tqdm.auto import tqdm

        times: dict[str, list] = {}
        for layer in layers:
            ins = widths_of(layer, layer.in_group, layer.in_channels)
            outs = widths_of(layer, layer.out_group, layer.out_channels)
            times[layer.name] = [0.0] * len(ins) if layer.depthwise else [[0.0] * len(outs) for _ in ins]
        checks, full = [], []
        cl_model = model.to(memory_format=fmt) if fmt is torch.channels_last else model
        cl_inputs = tuple(x.to(memory_format=fmt) if x.dim() == 4 else x for x in inputs)
        # The whole network at the start, half-way and at the end: the median of the three keeps
        # a burst of load on a shared machine out of the rest (= full - layers), where it would
        # shift every prediction.
        moments = {0, len(jobs) // 2}
        with eval_mode(model):
            for n, (layer, a, b, where) in enumerate(tqdm(jobs, desc="latency table", disable=not progress,
                                                         leave=False)):
                if n in moments:
                    full.append(timer(cl_model, cl_inputs))
                t = timer(*_layer_workload(modules, layer, a, b, device, dtype, fmt))
                if where[0] == "check":
                    checks.append({"layer": layer.name, "in": a, "out": b, "measured": t})
                elif len(where) == 2:
                    times[layer.name][where[1]] = t
                else:
                    times[layer.name][where[1]][where[2]] = t
            full.append(timer(cl_model, cl_inputs))
            networks = []
            for k in range(points - 1):  # every group narrowed alike, from the narrowest up
                widths = {g: w[round(k * (len(w) - 1) / (points - 1))] for g, w in grid.items()}
                small = _narrowed_network(model, inputs, widths, residual_streams)
                small_model = small.to(memory_format=fmt) if fmt is torch.channels_last else small
                networks.append({"widths": widths, "measured": timer(small_model, cl_inputs)})
        if fmt is torch.channels_last:
            model.to(memory_format=torch.contiguous_format)
        settings = {"points": points, "round_to": round_to, "min_channels": min_channels,
                    "timer": type(timer).__name__, "full_samples": full,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        table = cls(_key(model, inputs, layout, channels, layers, residual_streams), grid, times,
                    statistics.median(full), settings, networks=networks)
        for c in checks:
            layer = next(x for x in table.layers if x.name == c["layer"])
            c["interpolated"] = table._layer_time(layer, {layer.in_group: c["in"], layer.out_group: c["out"]})
        table.check = checks
        return table

    # -- predicting -------------------------------------------------------------------------------
    def _layer_time(self, layer: TimedLayer, widths: dict) -> float:
        t = self._monotone[layer.name]
        if layer.depthwise:
            i, j, f = _interp(self.grid[layer.in_group], widths[layer.in_group])
            return (1 - f) * t[i] + f * t[j]
        ins = self.grid[layer.in_group] if layer.in_group else [layer.in_channels]
        outs = self.grid[layer.out_group] if layer.out_group else [layer.out_channels]
        i0, i1, fi = _interp(ins, widths[layer.in_group] if layer.in_group else layer.in_channels)
        j0, j1, fj = _interp(outs, widths[layer.out_group] if layer.out_group else layer.out_channels)
        return ((1 - fi) * ((1 - fj) * t[i0][j0] + fj * t[i0][j1])
                + fi * ((1 - fj) * t[i1][j0] + fj * t[i1][j1]))

    def _widths(self, widths: dict[str, int] | None) -> dict[str, int]:
        full = dict(self.channels)
        if widths:
            unknown = [g for g in widths if g not in full]
            if unknown:
                raise ValueError(f"widths name groups the table does not have: {unknown}")
            full.update(widths)
        return full

    def layers_time(self, widths: dict[str, int] | None = None) -> float:
        """The sum of the timed layers' interpolated times at ``widths`` (seconds)."""
        widths = self._widths(widths)
        return sum(self._layer_time(layer, widths) for layer in self.layers)

    def _total(self, layers: float) -> float:
        """Whole-network seconds for a sum of layer times: piecewise linear through the measured
        networks, the rest (total - layers) held at the nearest measured one outside them."""
        pts = self._calibration
        if layers <= pts[0][0]:
            return pts[0][1] + (layers - pts[0][0])
        if layers >= pts[-1][0]:
            return pts[-1][1] + (layers - pts[-1][0])
        j = bisect.bisect_left([p[0] for p in pts], layers)
        (x0, y0), (x1, y1) = pts[j - 1], pts[j]
        return y0 + (y1 - y0) * (layers - x0) / (x1 - x0) if x1 > x0 else y1

    def _layers_budget(self, seconds: float) -> float:
        """The largest sum of layer times whose predicted whole network fits in ``seconds``."""
        pts = self._calibration
        if seconds >= pts[-1][1]:
            return pts[-1][0] + (seconds - pts[-1][1])
        for (x0, y0), (x1, y1) in zip(reversed(pts[:-1]), reversed(pts[1:])):
            if y0 <= seconds:
                return x1 if y1 <= seconds else (x0 + (x1 - x0) * (seconds - y0) / (y1 - y0) if y1 > y0 else x0)
        return pts[0][0] + (seconds - pts[0][1])

    def predict(self, widths: dict[str, int] | None = None) -> float:
        """Seconds per forward pass with each group at ``widths[group]`` channels (unnamed groups
        whole): the sum of the layers' interpolated times, plus the rest of the network
        interpolated between the measured whole networks (module docstring)."""
        return self._total(self.layers_time(widths))

    def terms(self) -> list[tuple[tuple[str, ...], Callable[..., float]]]:
        """The cost as :func:`~rnip_ext.pruning.knapsack.select_widths` terms, one per layer."""
        result = []
        for layer in self.layers:
            groups = tuple(dict.fromkeys(g for g in (layer.in_group, layer.out_group) if g is not None))

            def fn(*ws, layer=layer, groups=groups):
                return self._layer_time(layer, dict(zip(groups, ws)))
            result.append((groups, fn))
        return result

    def select(self, scores: dict[str, Tensor], budget: float, *, round_to: int | None = None,
               min_channels: int = 3, widths: dict[str, int] | None = None, fixed=()) -> Selection:
        """The widths keeping the most importance with predicted latency <= ``budget`` seconds
        (:func:`~rnip_ext.pruning.knapsack.select_widths` over :meth:`terms`), starting from
        ``widths`` (the current widths of a network already narrowed; default the table's) and
        never widening; groups in ``fixed`` keep their width. The widths ``round_to``/``min_channels`` allow must lie within the
        measured ones."""
        round_to = check_round_to(round_to)
        start = self._start(widths, round_to, min_channels, fixed)
        try:
            chosen = select_widths(start, scores, self.terms(), self._layers_budget(budget),
                                   round_to=round_to, min_channels=min_channels, fixed=fixed)
        except ValueError as exc:
            if "cannot be met" not in str(exc):
                raise
            raise self._unreachable(budget, start, round_to, min_channels, fixed) from exc
        return dataclasses.replace(chosen, cost=self._total(chosen.cost))

    def select_threshold(self, scores: dict[str, Tensor], budget: float, *, round_to: int | None = None,
                         min_channels: int = 3, widths: dict[str, int] | None = None, fixed=()) -> Selection:
        """The paper's rule under a latency budget: every group keeps as many channels as score at
        least one global threshold ``t`` (its best ones; the count rounded to the nearest allowed
        width, :func:`~rnip_ext.pruning.rounding.round_width`, as budget plans round), with ``t``
        the lowest score whose widths are predicted within ``budget`` seconds (a bisection over
        the sorted scores: a higher ``t`` never widens a group). Unlike
        :meth:`select`, the cost only sets ``t``, it does not choose between layers: the
        plan of ``plan(target_flops=...)`` with latency as the budget. Arguments as for
        :meth:`select`; ``gap_bound`` is ``nan`` (no optimality claim), ``steps`` the number of
        predictions made."""
        round_to = check_round_to(round_to)
        if not (isinstance(budget, (int, float)) and math.isfinite(budget)):
            raise ValueError(f"budget must be a finite number, got {budget!r}")
        start = self._start(widths, round_to, min_channels, fixed)
        for g, c in start.items():
            if g not in scores or len(scores[g]) != c:
                raise ValueError(f"scores for group {g!r} must have {c} entries")
        free = [g for g in start if g not in fixed]
        ranked = {g: torch.sort(scores[g].detach().cpu().to(torch.float64), descending=True).values for g in free}

        def at(t: float) -> dict[str, int]:
            out = dict(start)
            for g in free:
                out[g] = round_width(int((ranked[g] >= t).sum()), start[g], round_to, min_channels)
            return out

        thresholds = sorted({float(v) for g in free for v in ranked[g].tolist()}) + [math.inf]
        steps = 1
        if self.predict(at(math.inf)) > budget:
            raise self._unreachable(budget, start, round_to, min_channels, fixed)
        lo, hi = -1, len(thresholds) - 1  # predict(at(thresholds[hi])) <= budget; lo: none known too slow
        while hi - lo > 1:
            mid = (lo + hi) // 2
            steps += 1
            if self.predict(at(thresholds[mid])) <= budget:
                hi = mid
            else:
                lo = mid
        chosen = at(thresholds[hi])
        importance = sum(float(ranked[g][:chosen[g]].sum()) for g in free) + sum(
            float(scores[g].double().sum()) for g in start if g in fixed)
        return Selection(chosen, self.predict(chosen), importance, math.nan, steps)

    def _start(self, widths, round_to: int, min_channels: int, fixed) -> dict[str, int]:
        """The widths a selection starts from (``widths`` or the table's), checked against the grid."""
        start = self._widths(widths)
        for g, c in start.items():
            if g in fixed:
                continue
            if c > self.channels[g]:
                raise ValueError(f"group {g!r} has {c} channels, the latency table was measured up to "
                                 f"{self.channels[g]}")
            lowest = allowed_widths(c, round_to, min_channels)[0]
            if lowest < self.grid[g][0]:
                raise ValueError(
                    f"the latency table was measured down to {self.grid[g][0]} channels of {g!r}, the plan may keep "
                    f"{lowest} (round_to={round_to}, min_channels={min_channels}); build the table with the same "
                    f"round_to and min_channels (it has round_to={self.settings.get('round_to')}, "
                    f"min_channels={self.settings.get('min_channels')})")
        return start

    def _unreachable(self, budget: float, start: dict[str, int], round_to: int, min_channels: int,
                     fixed) -> ValueError:
        """The error for a budget below every layer at its narrowest (the message says "cannot be met")."""
        least = self.predict({g: c if g in fixed else allowed_widths(c, round_to, min_channels)[0]
                              for g, c in start.items()})
        return ValueError(f"a latency of {budget * 1e3:.4g} ms cannot be met: every layer at its narrowest "
                          f"(round_to={round_to}, min_channels={min_channels}) is predicted at {least * 1e3:.4g} ms")

    @property
    def interpolation_error(self) -> dict | None:
        """Relative errors ``|interpolated - measured| / measured`` at the check points:
        ``{"median", "max", "points"}``, or ``None`` when the table was built without checks."""
        errors = [abs(c["interpolated"] - c["measured"]) / c["measured"] for c in self.check if c["measured"] > 0]
        if not errors:
            return None
        return {"median": statistics.median(errors), "max": max(errors), "points": len(errors)}

    # -- saving and loading -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"latency_table": FORMAT, "key": self.key, "grid": self.grid, "times": self.times,
                "full": self.full, "networks": self.networks, "settings": self.settings, "check": self.check}

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the table as JSON, atomically (a temporary file renamed over ``path``). An
        existing file is replaced only with ``overwrite=True``, and only if it is a latency table."""
        path = os.fspath(path)
        if os.path.exists(path):
            if not overwrite:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
            try:
                with open(path) as f:
                    existing = json.load(f)
                ours = isinstance(existing, dict) and "latency_table" in existing
            except (OSError, ValueError):
                ours = False
            if not ours:
                raise ValueError(f"{path} exists and is not a latency table: not overwriting it")
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".latency-", suffix=".json", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None, example_inputs=None, *,
             layout: str = "contiguous") -> "LatencyTable":
        """Read a table saved by :meth:`save`. With ``model`` and ``example_inputs``, refuse
        (``ValueError``) a table measured for another device, torch version, thread count,
        dtype, layout, input shape or network (:meth:`validate`)."""
        try:
            with open(path) as f:
                data = json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path} is not a latency table (not JSON: {exc})") from exc
        if not isinstance(data, dict) or "latency_table" not in data:
            raise ValueError(f"{path} is not a latency table (no 'latency_table' field)")
        if data["latency_table"] != FORMAT:
            raise ValueError(f"{path} is a latency table of format {data['latency_table']}, this rnip_ext reads "
                             f"format {FORMAT}: build a new one")
        table = cls(data["key"], data["grid"], data["times"], data["full"], data["settings"], data.get("check"),
                    data.get("networks"))
        if model is not None:
            table.validate(model, example_inputs, layout=layout, source=str(path))
        return table

    def validate(self, model: nn.Module, example_inputs, *, layout: str = "contiguous",
                 source: str = "the latency table", narrowed: bool = False) -> dict[str, int]:
        """``ValueError`` naming the first field in which this table's measurements differ from
        ``model`` on ``example_inputs`` here (device, torch, threads, dtype, layout, inputs,
        groups, layers). ``narrowed=True`` accepts a network pruned from the table's (the same
        groups and layers, each group at most as wide). Returns the model's group widths."""
        inputs = _as_tuple(example_inputs)
        streams = self.residual_streams
        channels, layers = _layers(model, inputs, streams)
        here = json.loads(json.dumps(_key(model, inputs, layout, channels, layers, streams)))
        loose = ("groups", "layers") if narrowed else ()
        for field, stored in self.key.items():
            now = here.get(field)
            if field in loose or now == stored:
                continue
            if field == "layers":
                diff = next((f"layer {a['name']}" for a, b in zip(stored, now) if a != b),
                            f"{len(stored)} layers in the table, {len(now)} here")
                detail = f"the timed layers differ ({diff})"
            else:
                detail = f"{field} is {stored!r} in the table but {now!r} here"
            raise ValueError(f"{source} does not fit this model and machine: {detail}; build a new table "
                             "with LatencyTable.build (tables are per device, torch version and shape)")
        if narrowed:
            wider = [g for g, c in channels.items() if c > self.channels.get(g, -1)]
            same = [(a["name"], a["in_group"], a["out_group"], a["block"]) for a in self.key["layers"]] == [
                (a["name"], a["in_group"], a["out_group"], a["block"]) for a in here["layers"]]
            if set(channels) != set(self.channels) or wider or not same:
                raise ValueError(f"{source} does not fit this model: it was measured for channel groups "
                                 f"{self.channels}, the model has {channels}; build a new table for it")
        return channels


def _narrowed_network(model: nn.Module, inputs: tuple, widths: dict[str, int],
                      residual_streams: bool = False) -> nn.Module:
    """``model`` with each group keeping its first ``widths[group]`` channels (for timing only)."""
    from .apply import apply
    from .plan import plan_from_keep

    keep = {g: torch.arange(w) for g, w in widths.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return apply(model, plan_from_keep(model, keep, example_inputs=inputs,
                                           residual_streams=residual_streams)).eval()


def _monotone(times: list) -> list:
    """Each measured time replaced by the least time measured at the same or larger widths (a
    running minimum from the widest): a narrower copy of a layer does no more work, and a
    narrower measurement that came out slower is load on the machine, not the layer."""
    if not times or not isinstance(times[0], list):
        out, low = list(times), math.inf
        for i in reversed(range(len(out))):
            low = out[i] = min(low, out[i])
        return out
    out = [list(row) for row in times]
    for i in reversed(range(len(out))):
        for j in reversed(range(len(out[i]))):
            if i + 1 < len(out):
                out[i][j] = min(out[i][j], out[i + 1][j])
            if j + 1 < len(out[i]):
                out[i][j] = min(out[i][j], out[i][j + 1])
    return out


def _layer_workload(modules: dict, layer: TimedLayer, n_in: int, n_out: int, device, dtype, fmt):
    """The module and random input that time ``layer`` at ``n_in`` input and ``n_out`` output channels."""
    m = _narrow(modules[layer.name], n_in if layer.in_group else None, n_out if layer.out_group else None,
                layer.block)
    if layer.norm is not None:
        m = nn.Sequential(m, _narrow(modules[layer.norm], None, n_out))
    m = m.to(device=device, dtype=dtype).eval()
    shape = list(layer.input_shape)
    if layer.kind == "linear":
        shape[-1] = n_in * layer.block
    else:
        shape[1] = n_in
    x = torch.randn(shape, device=device, dtype=dtype)
    if x.dim() == 4 and fmt is torch.channels_last:
        m, x = m.to(memory_format=fmt), x.to(memory_format=fmt)
    return m, (x,)
