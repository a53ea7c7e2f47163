"""Model FLOPs (scaleattn.flops): single layers and whole tiny models against counts
written out by hand, one count for every lowering of the dilated convolutions."""

import jax
import jax.numpy as jnp
import pytest

from scaleattn import config as config_lib
from scaleattn import flops, models
from scaleattn.models import layers


def conv_count(h, w, cin, cout, k, batch=1, groups=1):
    """2 FLOPs per multiply-add: output pixels x Cout x (Cin / groups) x k x k."""
    return 2 * batch * h * w * cout * (cin // groups) * k * k


def layer_flops(module, x_shape):
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    return flops.function_flops(module.apply, variables, x)


@pytest.mark.parametrize("kwargs, out_hw", [
    (dict(stride=1), (9, 7)),
    (dict(stride=2), (5, 4)),
    (dict(stride=2, groups=2), (5, 4)),
    (dict(dilation=4), (9, 7)),       # 9 taps, not the (2 * 4 + 1)² of a padded kernel
    (dict(dilation=12), (9, 7)),      # taps that only ever read the padding still count
])
def test_a_convolution_is_its_hand_count(kwargs, out_hw):
    groups = kwargs.get("groups", 1)
    got = layer_flops(layers.conv(6, 3, use_bias=True, dilated_conv="native", **kwargs),
                      (2, 9, 7, 4))
    assert got == 2 * 2 * out_hw[0] * out_hw[1] * 6 * (4 // groups) * 3 * 3


def test_pointwise_and_dense_layers_are_matrix_products():
    # a 1x1 conv with stride 2 as a product: 5 x 4 pixels kept, 4 -> 6 channels
    assert layer_flops(layers.conv(6, 1, stride=2), (2, 9, 7, 4)) == 2 * 2 * 5 * 4 * 4 * 6
    # the same as XLA's convolution
    assert layer_flops(layers.conv(6, 1, stride=2, pointwise_conv="conv"),
                       (2, 9, 7, 4)) == 2 * 2 * 5 * 4 * 4 * 6
    assert flops.function_flops(jnp.matmul, jnp.zeros((3, 5, 7)),
                                jnp.zeros((7, 2))) == 2 * 3 * 5 * 2 * 7


def test_nested_jaxprs_scan_cond_and_while():
    a, w = jnp.zeros((4, 8)), jnp.zeros((8, 8))
    matmul = 2 * 4 * 8 * 8

    def scanned(a, w):
        return jax.lax.scan(lambda c, _: (c @ w, None), a, None, length=5)[0]

    assert flops.function_flops(scanned, a, w) == 5 * matmul
    assert flops.function_flops(jax.jit(lambda a, w: (a @ w) @ w), a, w) == 2 * matmul
    assert flops.function_flops(jax.nn.relu, a) == 0  # a custom_jvp around no product
    branches = lambda p, a, w: jax.lax.cond(p, lambda: a @ w @ w, lambda: a @ w)
    assert flops.function_flops(branches, True, a, w) == 2 * matmul  # the larger branch
    looped = lambda a, w: jax.lax.while_loop(lambda c: c[0, 0] < 1, lambda c: c @ w, a)
    with pytest.raises(ValueError, match="while loop"):
        flops.function_flops(looped, a, w)


def tiny(recipe, **model):
    config = config_lib.recipe(recipe)
    config.model.width, config.model.num_classes = 1 / 16, 5
    for key, value in model.items():
        config.model[key] = value
    return config.model


def vgg_branch(size, batch):
    """Tiny VGG16-LargeFOV (one conv per block, widths 4/8/16/32/32, fc 2): the conv
    sizes of an input ``size`` (3x3/2 pools with padding 1 after blocks 1-3)."""
    s1 = size
    s2 = -(-s1 // 2)  # a 3x3/2 pool with padding 1: ceil(n / 2)
    s3 = -(-s2 // 2)
    s4 = -(-s3 // 2)
    return batch * (conv_count(s1, s1, 3, 4, 3) + conv_count(s2, s2, 4, 8, 3)
                    + conv_count(s3, s3, 8, 16, 3) + conv_count(s4, s4, 16, 32, 3)
                    + conv_count(s4, s4, 32, 32, 3)          # conv5_1, dilation 2
                    + conv_count(s4, s4, 32, 2, 3)           # fc6, dilation 12
                    + conv_count(s4, s4, 2, 2, 1)            # fc7
                    + conv_count(s4, s4, 2, 5, 1))           # fc8


def test_tiny_vgg_largefov_is_its_hand_count():
    m = tiny("voc", depth=(1, 1, 1, 1, 1), fc_width=32, scales=(1.0,))
    # 17 -> 9 -> 5 -> 3 after the three stride-2 pools
    hand = 2 * (conv_count(17, 17, 3, 4, 3) + conv_count(9, 9, 4, 8, 3)
                + conv_count(5, 5, 8, 16, 3) + conv_count(3, 3, 16, 32, 3)
                + conv_count(3, 3, 32, 32, 3) + conv_count(3, 3, 32, 2, 3)
                + conv_count(3, 3, 2, 2, 1) + conv_count(3, 3, 2, 5, 1))
    assert hand == vgg_branch(17, 2)
    assert flops.model_flops(m, (2, 17, 17, 3)) == hand
    assert flops.model_flops(m, (2, 17, 17, 3), train=True) == hand


def test_two_scale_vgg_adds_the_resizes_and_the_merge():
    m = tiny("voc", depth=(1, 1, 1, 1, 1), fc_width=32, scales=(1.0, 0.5), merge="avg")
    b = 2
    # the 0.5 branch reads the image resized 17 -> 9 (rows, then columns: two products
    # with interpolation matrices over the 17 input positions), runs at 9 -> 5 -> 3 -> 2
    # and its 2 x 2 logits are resized to 3 x 3 (contracting 2 positions each time);
    # the average is a weighted sum over the 2 scales.
    image_resize = 2 * b * (9 * 17 * 3 * 17 + 9 * 9 * 3 * 17)
    logit_resize = 2 * b * (3 * 2 * 5 * 2 + 3 * 3 * 5 * 2)
    merge = 2 * b * 3 * 3 * 5 * 2
    hand = (vgg_branch(17, b) + image_resize + vgg_branch(9, b) + logit_resize + merge)
    assert flops.model_flops(m, (b, 17, 17, 3)) == hand


def test_tiny_resnet_aspp_is_its_hand_count():
    m = tiny("voc_r101", depth=(1, 1, 1, 1), scales=(1.0,))
    # 17 -> stem 7x7/2 -> 9 -> max pool 3x3/2 -> 5; layer2's 3x3/2 -> 3; layers 3 and
    # 4 dilated (rates 2 and 4) at 3 x 3. Bottleneck widths (inner, out) at width 1/16:
    # (4, 16), (8, 32), (16, 64), (32, 128); every first block projects its shortcut.
    hand = (conv_count(9, 9, 3, 4, 7)
            # layer1 at 5 x 5: 1x1 4->4, 3x3 4->4, 1x1 4->16, shortcut 4->16
            + conv_count(5, 5, 4, 4, 1) + conv_count(5, 5, 4, 4, 3)
            + conv_count(5, 5, 4, 16, 1) + conv_count(5, 5, 4, 16, 1)
            # layer2: 1x1 16->8 at 5 x 5, 3x3/2 8->8 to 3 x 3, 1x1 8->32, shortcut /2
            + conv_count(5, 5, 16, 8, 1) + conv_count(3, 3, 8, 8, 3)
            + conv_count(3, 3, 8, 32, 1) + conv_count(3, 3, 16, 32, 1)
            # layer3 (rate 2) and layer4 (rate 4) at 3 x 3
            + conv_count(3, 3, 32, 16, 1) + conv_count(3, 3, 16, 16, 3)
            + conv_count(3, 3, 16, 64, 1) + conv_count(3, 3, 32, 64, 1)
            + conv_count(3, 3, 64, 32, 1) + conv_count(3, 3, 32, 32, 3)
            + conv_count(3, 3, 32, 128, 1) + conv_count(3, 3, 64, 128, 1)
            # ASPP: four 3x3 classifiers 128 -> 5 (rates 6, 12, 18, 24)
            + 4 * conv_count(3, 3, 128, 5, 3))
    assert flops.model_flops(m, (1, 17, 17, 3)) == hand
    assert flops.model_flops(m, (3, 17, 17, 3)) == 3 * hand
    steps = flops.step_flops(m, 3, 17)
    assert steps == {"forward": 3 * hand, "train": 9 * hand, "eval": 3 * hand}


def test_one_count_for_every_lowering():
    """A two-scale ResNet-ASPP with attention: the model FLOPs do not depend on how the
    dilated convs are lowered, on batch-norm folding or on remat, while what each
    lowering traces does differ (space-to-batch pads, taps drops dead taps)."""
    shape = (2, 33, 33, 3)
    base = dict(depth=(1, 1, 1, 1), scales=(1.0, 0.5), aspp_rates=(2, 12))
    counts = {impl: flops.model_flops(tiny("voc_r101", dilated_conv=impl, **base), shape)
              for impl in ("native", "space_to_batch", "taps", "auto")}
    counts["unfolded"] = flops.model_flops(
        tiny("voc_r101", fold_frozen_bn=False, **base), shape)
    counts["remat"] = flops.model_flops(tiny("voc_r101", remat=True, **base), shape)
    assert len(set(counts.values())) == 1, counts
    traced = {impl: flops.forward_flops(
        models.build_model(tiny("voc_r101", dilated_conv=impl, **base)), shape)
        for impl in ("native", "space_to_batch", "taps")}
    assert traced["native"] == counts["native"]
    assert traced["space_to_batch"] > traced["native"] > traced["taps"]


def test_forward_flops_count_what_a_lowering_traces():
    """`forward_flops` counts the lowering it is given: space-to-batch's convolution
    runs over 3² sub-images of 4 x 4 (10 padded to 12), 144 output pixels for 100."""
    rewrite = layers.conv(4, 3, dilation=3, dilated_conv="space_to_batch")
    native = layers.conv(4, 3, dilation=3, dilated_conv="native")
    assert layer_flops(rewrite, (1, 10, 10, 4)) == conv_count(12, 12, 4, 4, 3)
    assert layer_flops(native, (1, 10, 10, 4)) == conv_count(10, 10, 4, 4, 3)
