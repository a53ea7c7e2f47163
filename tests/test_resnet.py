"""ResNet / ResNeXt backbones: parameter counts, names, strides, blocks vs numpy, BN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpy_reference import np_conv
from scaleattn.models import layers
from scaleattn.models import resnet as resnet_lib
from scaleattn.models.resnet import Bottleneck, resnet, stage_layout

TINY = dict(depth=(1, 1, 1, 1), width=1 / 16)


def count_params(variables) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def abstract_init(model, size=(1, 32, 32, 3)):
    """``(output, variables)`` as shapes only: nothing is computed."""
    return jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros(size), train=False))


def random_variables(model, x, seed=0):
    """Variables of ``model`` for input ``x``, drawn with numpy (He-normal kernels, random
    BN affine and statistics). Much faster than a jitted `init` on CPU, whose random
    number generation takes XLA seconds to compile."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1])
            return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.2, leaf.shape).astype(np.float32)   # bias, mean
    return jax.tree_util.tree_map_with_path(draw, shapes)


# ---- published parameter counts (torchvision, 1000 classes) ---------------------

@pytest.mark.parametrize("arch, expected", [
    ("resnet50", 25_557_032),
    ("resnet101", 44_549_160),
    ("resnext101_32x4d", 44_177_704),
    ("resnext101_32x8d", 88_791_336),
])
def test_parameter_count_matches_torchvision(arch, expected):
    _, variables = abstract_init(resnet(arch, num_classes=1000))
    assert count_params(variables) == expected


def test_parameter_names_mirror_torchvision():
    logits, variables = abstract_init(resnet("resnet50", num_classes=10))
    params = variables["params"]
    blocks = [f"layer{s}_{b}" for s, n in enumerate((3, 4, 6, 3), 1) for b in range(n)]
    assert set(params) == {"conv1", "bn1", "fc", *blocks}
    assert set(params["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                       "downsample_conv", "bn_downsample"}
    assert set(params["layer1_1"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3"}
    assert set(variables["batch_stats"]["layer2_0"]["bn_downsample"]) == {"mean", "var"}
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert params["fc"]["kernel"].shape == (2048, 10)
    assert logits.shape == (1, 10)


def test_resnext_grouped_kernel_layout():
    _, variables = abstract_init(resnet("resnext101_32x4d"))
    params = variables["params"]
    assert params["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 4, 128)  # 32 groups x 4
    assert params["layer4_2"]["conv2"]["kernel"].shape == (3, 3, 32, 1024)
    assert params["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 1024, 2048)


def test_factory_depth_override_and_unknown_name():
    model = resnet("resnext101_32x8d", depth=(1, 2, 1, 1), width=0.5)
    assert model.stage_sizes == (1, 2, 1, 1) and model.groups == 32
    assert model.width_per_group == 8
    assert resnet("resnet50", name="backbone").name == "backbone"
    with pytest.raises(ValueError, match="unknown ResNet"):
        resnet("resnet18")


# ---- output stride, dilation, multi-grid -------------------------------------------

@pytest.mark.parametrize("output_stride, size, expected", [
    (8, (33, 47), (5, 6)),      # ceil(33 / 8), ceil(47 / 8)
    (16, (33, 47), (3, 3)),
    (32, (33, 47), (2, 2)),
    (8, (513, 513), (65, 65)),  # DeepLab's sizes
    (8, (321, 321), (41, 41)),
    (16, (513, 513), (33, 33)),
])
def test_output_stride_gives_ceil_sizes(output_stride, size, expected):
    model = resnet("resnet50", output_stride=output_stride, **TINY)
    features, _ = abstract_init(model, (2, *size, 3))
    assert features.shape == (2, *expected, 128)   # 2048 / 16 channels


def test_stage_layout():
    layout = stage_layout((3, 4, 23, 3), 8, (1, 2, 4))
    assert layout[0] == [(1, 1)] * 3
    assert layout[1] == [(2, 1)] + [(1, 1)] * 3
    assert layout[2] == [(1, 2)] * 23          # every block dilated, as in DeepLab
    assert layout[3] == [(1, 4), (1, 8), (1, 16)]
    layout = stage_layout((3, 4, 6, 3), 16)
    assert layout[2][0] == (2, 1) and layout[3] == [(1, 2)] * 3
    assert stage_layout((1, 1, 1, 1), 32) == [[(1, 1)], [(2, 1)], [(2, 1)], [(2, 1)]]
    with pytest.raises(ValueError, match="multi_grid"):
        stage_layout((3, 4, 6, 3), 8, (1, 2))
    with pytest.raises(ValueError, match="output_stride"):
        stage_layout((3, 4, 6, 3), 4)


@pytest.mark.parametrize("stride_in_1x1", [False, True])
def test_module_convs_follow_layout(stride_in_1x1):
    """Every conv the network runs has the stride and dilation `stage_layout` says."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        module, name = context.module, "/".join(context.module.path)
        if context.method_name == "__call__" and isinstance(module, nn.Conv):
            seen[name] = (module.strides, module.kernel_dilation)
        elif context.method_name == "__call__" and isinstance(module, layers.PointwiseConv):
            seen[name] = ((module.stride, module.stride), (1, 1))  # 1x1 as a matmul
        return next_fun(*args, **kwargs)

    model = resnet("resnet50", depth=(1, 1, 1, 3), width=1 / 16, output_stride=8,
                   multi_grid=(1, 2, 4), stride_in_1x1=stride_in_1x1)
    with nn.intercept_methods(record):
        abstract_init(model)
    strided, plain = ("conv1", "conv2") if stride_in_1x1 else ("conv2", "conv1")
    assert seen["conv1"] == ((2, 2), (1, 1))
    assert seen[f"layer2_0/{strided}"] == ((2, 2), (1, 1))
    assert seen[f"layer2_0/{plain}"][0] == (1, 1)
    assert seen["layer2_0/downsample_conv"] == ((2, 2), (1, 1))
    assert seen["layer3_0/conv2"] == ((1, 1), (2, 2))
    assert seen["layer3_0/downsample_conv"] == ((1, 1), (1, 1))
    assert [seen[f"layer4_{b}/conv2"][1] for b in range(3)] == [(4, 4), (8, 8), (16, 16)]


# ---- a bottleneck block against numpy ----------------------------------------------

def np_frozen_bn(x, params, stats):
    return ((x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"]
            + params["bias"])


def np_bottleneck(x, params, stats, *, groups, stride, dilation, stride_in_1x1):
    relu = lambda t: np.maximum(t, 0)
    s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
    y = relu(np_frozen_bn(np_conv(x, params["conv1"]["kernel"], s1), params["bn1"],
                          stats["bn1"]))
    y = relu(np_frozen_bn(np_conv(y, params["conv2"]["kernel"], s3, dilation, groups),
                          params["bn2"], stats["bn2"]))
    y = np_frozen_bn(np_conv(y, params["conv3"]["kernel"]), params["bn3"], stats["bn3"])
    shortcut = x
    if "downsample_conv" in params:
        shortcut = np_frozen_bn(np_conv(x, params["downsample_conv"]["kernel"], stride),
                                params["bn_downsample"], stats["bn_downsample"])
    return relu(y + shortcut)


@pytest.mark.parametrize("in_channels, groups, stride, dilation, stride_in_1x1, dilated_conv", [
    (6, 4, 2, 1, False, "native"),  # ResNeXt-style grouped 3x3, strided, projected shortcut
    (6, 4, 2, 1, True, "native"),   # Caffe-style stride on the first 1x1
    (6, 2, 1, 2, False, "native"),  # dilated, projection for the channel change only
    (6, 2, 1, 2, False, "space_to_batch"),  # the same, dilated conv as space-to-batch
    (6, 1, 1, 4, False, "taps"),    # rate 4 on a 9 x 7 map, dilated conv as taps
    (12, 1, 1, 1, False, "native"),  # identity shortcut
])
def test_bottleneck_matches_numpy(in_channels, groups, stride, dilation, stride_in_1x1,
                                  dilated_conv):
    block = Bottleneck(inner_channels=8, out_channels=12, groups=groups, stride=stride,
                       dilation=dilation, stride_in_1x1=stride_in_1x1,
                       dilated_conv=dilated_conv)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 7, in_channels)).astype(np.float32)
    variables = random_variables(block, x)
    assert ("downsample_conv" in variables["params"]) == (in_channels != 12 or stride != 1)
    assert variables["params"]["conv2"]["kernel"].shape == (3, 3, 8 // groups, 8)

    out = jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x)
    expected = np_bottleneck(x.astype(np.float64),
                             jax.tree.map(np.asarray, variables["params"]),
                             jax.tree.map(np.asarray, variables["batch_stats"]),
                             groups=groups, stride=stride, dilation=dilation,
                             stride_in_1x1=stride_in_1x1)
    assert out.shape == expected.shape == (2, -(-9 // stride), -(-7 // stride), 12)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


# ---- batch norm modes ----------------------------------------------------------------

@pytest.mark.parametrize("bn_mode", ["frozen", "train"])
def test_bn_mode(bn_mode):
    model = resnet("resnext101_32x4d", bn_mode=bn_mode, output_stride=16, **TINY)
    x = np.random.default_rng(0).normal(size=(2, 33, 33, 3)).astype(np.float32)
    variables = random_variables(model, x)
    features, updates = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                                         mutable=["batch_stats"]))(variables, x)
    eval_features = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert features.shape == (2, 3, 3, 128)
    stats_changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                                 variables["batch_stats"], updates["batch_stats"])
    if bn_mode == "frozen":
        assert not any(jax.tree.leaves(stats_changed))
        np.testing.assert_array_equal(features, eval_features)
    else:
        assert all(jax.tree.leaves(stats_changed))
        assert not np.allclose(features, eval_features)


def test_bad_bn_mode_fails():
    with pytest.raises(ValueError, match="bn_mode"):
        abstract_init(resnet("resnet50", bn_mode="sync", **TINY))


def test_scaled_never_zero():
    assert resnet_lib.scaled(4, 1 / 16) == 1 and resnet_lib.scaled(64, 0.5) == 32
