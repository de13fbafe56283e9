"""The model zoo the pruning is tried on: BatchNorm CNNs of torchvision and timm (test helper only).

torchvision's wheel on this project's package index is a CUDA build whose compiled operators do
not register against the CPU torch wheel (``operator torchvision::nms does not exist``, raised
while ``torchvision._meta_registrations`` is imported). The model *definitions* need none of
those operators, so :func:`torchvision_models` puts an empty module in ``sys.modules`` under that
name before the first import. This trick belongs to the tests and benchmarks only: the package
never imports torchvision for its models.

Lists:

* :data:`TORCHVISION_MODELS` (57): every BatchNorm classification model of the list Torch-Pruning's
  own torchvision example prunes (``benchmarks/prunability/torchvision_pruning.py``), plus
  ``regnet_x_*`` and ``resnext101_64x4d``.
* :data:`TIMM_MODELS` (29): BatchNorm CNNs of timm chosen to cover its block types: plain and
  grouped residual nets, squeeze-and-excitation / ECA / selective-kernel gates, Res2Net splits,
  ``BatchNormAct2d`` (fused norm + activation) families, ``tf_`` same-padding convolutions,
  dual-path and cross-stage-partial nets, DenseNet and VoVNet concatenations.

``build(source, name)`` returns the model in eval mode on the CPU with random weights;
``input_size(name)`` the small input the tests use.
"""

from __future__ import annotations

import sys
import types

TORCHVISION_MODELS = [
    "densenet121", "densenet161", "densenet169", "densenet201",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l",
    "googlenet", "inception_v3",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf",
    "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf",
    "regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf",
    "regnet_x_16gf", "regnet_x_32gf",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
]  # fmt: skip

TIMM_MODELS = [
    # nn.BatchNorm2d residual nets, plain, grouped and gated
    "resnet18", "resnet50", "resnet26d", "wide_resnet50_2", "resnext50_32x4d", "seresnet50",
    "seresnext26d_32x4d", "ecaresnet26t", "res2net50_26w_4s", "skresnet18", "rexnet_100",
    # BatchNormAct2d families
    "regnetx_002", "regnety_002", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv2_100",
    "mobilenetv3_large_100", "mixnet_s", "fbnetc_100", "lcnet_050", "ghostnet_100", "dpn68",
    "cspresnet50", "cspdarknet53", "repvgg_a2", "gernet_s", "densenet121", "ese_vovnet19b_dw",
    "inception_v3",
]  # fmt: skip

# Models whose stem or pooling needs a larger input than DEFAULT_SIZE.
_INPUT_SIZE = {"inception_v3": 96}
DEFAULT_SIZE = 64


def input_size(name: str) -> tuple[int, int, int, int]:
    """The (N, C, H, W) input the zoo tests feed ``name``."""
    side = _INPUT_SIZE.get(name, DEFAULT_SIZE)
    return (1, 3, side, side)


def torchvision_models():
    """``torchvision.models``, or ``None`` when torchvision is not installed (see the module docstring)."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        import torchvision.models as tvm
    except ImportError:
        return None
    return tvm


def timm_module():
    """``timm``, or ``None`` when it is not installed (it imports torchvision: same stub)."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        import timm
    except ImportError:
        return None
    return timm


def build(source: str, name: str):
    """``name`` from ``source`` (``"torchvision"`` or ``"timm"``): random weights, eval mode, CPU."""
    if source == "torchvision":
        tvm = torchvision_models()
        kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        model = tvm.get_model(name, weights=None, **kwargs)
    elif source == "timm":
        model = timm_module().create_model(name, pretrained=False)
    else:
        raise ValueError(f"source must be 'torchvision' or 'timm', got {source!r}")
    return model.eval()
