"""convert_batchnorm over the torchvision and timm BatchNorm CNNs of tests/zoo_models.py.

Each model gets three draws of trained-looking BatchNorms (see convert_helpers.trained_looking):

* ``wide``: ``|gamma| ~ U(0, 2)``, random signs, 10% of channels scaled by 1e-6, one exact zero;
* ``signed``: the same with ``|gamma| < 0.95``;
* ``positive``: ``0 <= gamma < 0.95``.

A conversion either keeps the function (eval and training mode, then eval again on the updated
running statistics; in CI float32 to 1e-3 of the output; with RNIP_CONVERT_ZOO=all float64 to 1e-8,
or float32 to 1e-3 for models over 12M parameters) with every activation module still there, or raises the documented
``ValueError`` whose every line names one of the two layouts where exactness is impossible:
``|gamma| >= 1`` before a non-positively-homogeneous operation, or negative gammas that no own
convolution can carry. Which draws each model refuses is pinned down in ``EXPECTED``; ``positive``
always converts exactly.

CI runs ``CI_MODELS``; ``RNIP_CONVERT_ZOO=all`` runs every model (see docs/conversion.md for the
table and the time it takes).
"""

import copy
import os
import re

import pytest
import torch

import zoo_models
from convert_helpers import assert_same_function, count_activations, trained_looking
from rnip_ext import convert_batchnorm

ALL = [("torchvision", n) for n in zoo_models.TORCHVISION_MODELS] + [("timm", n) for n in zoo_models.TIMM_MODELS]
CI_MODELS = {
    ("torchvision", "resnet18"), ("torchvision", "mobilenet_v2"), ("torchvision", "mobilenet_v3_small"),
    ("torchvision", "shufflenet_v2_x0_5"), ("torchvision", "densenet121"), ("torchvision", "googlenet"),
    ("torchvision", "regnet_y_400mf"), ("torchvision", "mnasnet0_5"), ("torchvision", "efficientnet_b0"),
    ("timm", "regnetx_002"), ("timm", "mobilenetv3_large_100"), ("timm", "tf_efficientnet_b0"),
    ("timm", "rexnet_100"), ("timm", "lcnet_050"), ("timm", "ese_vovnet19b_dw"), ("timm", "seresnext26d_32x4d"),
}  # fmt: skip
# The layouts where exactness is impossible (docs/conversion.md), per model: "scale" (|gamma| >= 1
# before SiLU/Hardswish/sigmoid; fine below 1), "negative" (BatchNorms without a convolution of
# their own: after a concatenation, or on a block's input). Every other model is exact in all draws.
SILU_LIKE = {"wide": "scale", "signed": "exact", "positive": "exact"}
AFTER_CONCAT = {"wide": "negative", "signed": "negative", "positive": "exact"}
EXPECTED = {
    **{("torchvision", f"densenet{d}"): AFTER_CONCAT for d in (121, 161, 169, 201)},
    ("timm", "densenet121"): AFTER_CONCAT, ("timm", "dpn68"): AFTER_CONCAT,
    ("timm", "repvgg_a2"): AFTER_CONCAT,  # the identity branch's BatchNorm reads the block's input
    **{("torchvision", n): SILU_LIKE for n in zoo_models.TORCHVISION_MODELS if n.startswith("efficientnet")},
    ("torchvision", "mobilenet_v3_large"): SILU_LIKE, ("torchvision", "mobilenet_v3_small"): SILU_LIKE,
    ("timm", "efficientnet_b0"): SILU_LIKE, ("timm", "mobilenetv3_large_100"): SILU_LIKE,
    ("timm", "rexnet_100"): SILU_LIKE, ("timm", "lcnet_050"): SILU_LIKE,
    # MixedConv2d splits, convolves and concatenates before its BatchNorm; Conv2dSame cannot be traced.
    ("timm", "mixnet_s"): {"wide": "scale", "signed": "negative", "positive": "exact"},
    ("timm", "tf_efficientnet_b0"): {"wide": "scale", "signed": "negative", "positive": "exact"},
}  # fmt: skip
DRAWS = {"wide": dict(peak=2.0, signed=True), "signed": dict(peak=0.95, signed=True),
         "positive": dict(peak=0.95, signed=False)}
# The two documented reasons, one per problem line of the error.
REASONS = re.compile(
    r"  - ('[^']+': (\|gamma\| reaches \S+ >= 1, and (its output .* reaches .* before any convolution|torch\.fx "
    r"could not trace).*|\d+ negative gamma\(s\) .* need a convolution to carry their sign, but .*)|\.\.\. and \d+ more)"
)
RUN_ALL = os.environ.get("RNIP_CONVERT_ZOO", "") == "all"
PARAMS = [pytest.param(s, n, id=f"{s}-{n}") for s, n in ALL if RUN_ALL or (s, n) in CI_MODELS]


def _library(source):
    return zoo_models.torchvision_models() if source == "torchvision" else zoo_models.timm_module()


@pytest.mark.parametrize("source,name", PARAMS)
def test_conversion_keeps_the_function_or_names_why_it_cannot(source, name):
    if _library(source) is None:
        pytest.skip(reason=f"{source} is not installed (test extra)")
    g = torch.Generator().manual_seed(0)
    base = zoo_models.build(source, name)
    # float64 convolutions take CPU's slow path (~3x the time). CI checks in float32, where rounding
    # (amplified by batch statistics of 2 samples) stays below 1e-3 of the output and any change of
    # function is O(1); the float64 proof of exactness to rounding is test_convert_fold.py's. The full
    # run uses float64 below 12M parameters, and for Inception-V3, which ends on a 1x1 map: statistics
    # of 2 values there amplify float32 rounding to O(1) in training mode.
    params = sum(p.numel() for p in base.parameters())
    big = not RUN_ALL or (params > 12e6 and name != "inception_v3")
    dtype = torch.float32 if big else torch.float64
    x = torch.randn(2, *zoo_models.input_size(name)[1:], generator=g, dtype=dtype)
    results, activations = {}, {}
    for draw, spread in DRAWS.items():
        model = trained_looking(copy.deepcopy(base), g, **spread).to(dtype)
        converted = copy.deepcopy(model)
        try:
            convert_batchnorm(converted)
        except ValueError as exc:
            lines = str(exc).splitlines()
            assert lines[0].startswith("convert_batchnorm cannot keep the function of"), lines[0]
            problems = [line for line in lines[1:] if line.startswith("  - ")]
            assert problems and all(REASONS.fullmatch(p) for p in problems), problems
            named = [p for p in problems if not p.startswith("  - ... and")]
            results[draw] = "negative" if all("negative gamma" in p for p in named) else "scale"
            continue
        activations[draw] = (count_activations(model), count_activations(converted))
        assert activations[draw][0] == activations[draw][1]
        assert_same_function(model, converted, x, rtol=1e-3 if big else 1e-8)
        results[draw] = "exact"
    print(f"zoo: {source} {name} {results} activations {activations.get('positive')}")  # the table, with -s
    assert results == EXPECTED.get((source, name), dict.fromkeys(DRAWS, "exact"))
