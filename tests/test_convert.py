"""ImageNet weights -> Flax: safe readers, torchvision/Keras mappings, parity, init_from.

The foreign files are written here without PyTorch: `save_torch_zip` / `save_torch_legacy`
emit the pickle opcodes torch.save emits (protocol 2, storages as persistent ids),
independently of the readers under test; `.safetensors` files are written by the
safetensors package itself (`safetensors.numpy.save_file`).
Keras files come from keras.applications itself (random weights, no download).
"""

import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

from scaleattn import config as config_lib
from scaleattn import convert, experiment, pretrained
from scaleattn.models import build_model, heads, layers, resnet, vgg
from scaleattn.pretrained import UnsafePickleError, WeightsError

CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)   # keras 'caffe' mean, in RGB order


def rel_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the error relative to the feature scale."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ============================================================ writers (torch.save layout)

STORAGE_CLASSES = {np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage",
                   np.dtype("float64"): "DoubleStorage", np.dtype("int64"): "LongStorage",
                   np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
                   np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage"}


def contiguous_strides(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def as_storages(state):
    """``{name: array}`` -> ``(tensors, storages)``: one contiguous storage per tensor.
    ``tensors[name] = (storage key, offset, size, stride)``, ``storages[key]`` 1-D."""
    tensors, storages = {}, {}
    for i, (name, value) in enumerate(state.items()):
        value = np.asarray(value)
        storages[str(i)] = value.reshape(-1)
        tensors[name] = (str(i), 0, value.shape, contiguous_strides(value.shape))
    return tensors, storages


class TorchPickle:
    """The protocol-2 pickle torch.save writes for an ``OrderedDict`` state dict:
    ``_rebuild_tensor_v2(('storage', torch.FloatStorage, key, 'cpu', numel), offset,
    size, stride, False, OrderedDict())`` per tensor, then ``_metadata`` via BUILD."""

    def __init__(self, legacy: bool, globals_override=None):
        self.legacy = legacy
        self.rebuild = globals_override or ("torch._utils", "_rebuild_tensor_v2")

    @staticmethod
    def string(s):
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    @staticmethod
    def integer(n):
        if 0 <= n < 256:
            return b"K" + bytes([n])
        if -2 ** 31 <= n < 2 ** 31:
            return b"J" + struct.pack("<i", n)
        raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw

    @staticmethod
    def glob(module, name):
        return b"c" + f"{module}\n{name}\n".encode()

    def tuple_of(self, items):
        return b"(" + b"".join(self.integer(i) for i in items) + b"t"

    def ordered_dict(self):
        return self.glob("collections", "OrderedDict") + b")R"

    def tensor(self, key, offset, size, stride, storage):
        pid = (b"(" + self.string("storage") +
               self.glob("torch", STORAGE_CLASSES[storage.dtype]) + self.string(key) +
               self.string("cpu") + self.integer(storage.size) +
               (b"N" if self.legacy else b"") + b"tQ")
        return (self.glob(*self.rebuild) + b"(" + pid + self.integer(offset) +
                self.tuple_of(size) + self.tuple_of(stride) + b"\x89" + self.ordered_dict() +
                b"tR")

    def dumps(self, tensors, storages):
        body = b"".join(self.string(name) + self.tensor(key, off, size, stride, storages[key])
                        for name, (key, off, size, stride) in tensors.items())
        metadata = b"}" + self.string("_metadata") + self.ordered_dict() + b"s"
        return b"\x80\x02" + self.ordered_dict() + b"(" + body + b"u" + metadata + b"b."


def save_torch_zip(path, state, storages=None, pickle_bytes=None):
    """torch >= 1.6 format: a zip of ``archive/data.pkl`` and ``archive/data/<key>``."""
    tensors, storages = (state, storages) if storages is not None else as_storages(state)
    data = pickle_bytes or TorchPickle(legacy=False).dumps(tensors, storages)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/byteorder", "little")
        for key, storage in storages.items():
            zf.writestr(f"archive/data/{key}", storage.tobytes())
        zf.writestr("archive/version", "3\n")


def save_torch_legacy(path, state, storages=None):
    """torch < 1.6 format: magic, protocol, sys info, the pickle, the storage keys, then
    per storage its element count (int64) and its bytes."""
    tensors, storages = (state, storages) if storages is not None else as_storages(state)
    keys = sorted(storages)
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with open(path, "wb") as f:
        for obj in (0x1950a86a20f9469cfc6c, 1001, sys_info):
            f.write(pickle.dumps(obj, protocol=2))
        f.write(TorchPickle(legacy=True).dumps(tensors, storages))
        f.write(pickle.dumps(keys, protocol=2))
        for key in keys:
            f.write(struct.pack("<q", storages[key].size) + storages[key].tobytes())


def save_safetensors(path, state):
    """``{name: array}`` -> a ``.safetensors`` file written by the safetensors package,
    with the ``{'format': 'pt'}`` metadata torch's own writer adds."""
    safetensors_numpy.save_file({k: np.array(v, order="C") for k, v in state.items()},
                                str(path), metadata={"format": "pt"})


# ============================================================ torchvision's layout (spec)


def scaled(c, width):
    return max(1, int(c * width))


def torchvision_resnet_shapes(arch, width=1.0, depth=()):
    """Key -> shape of torchvision's ``resnet50`` ... ``resnext101_32x8d`` state dict
    (torchvision.models.resnet.Bottleneck), channels times ``width`` as our models do."""
    cfg = resnet.ARCHITECTURES[arch]
    groups, per_group = cfg.get("groups", 1), cfg.get("width_per_group", 64)
    shapes = {}

    def bn(prefix, c):
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,),
                       f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,),
                       f"{prefix}.num_batches_tracked": ()})

    inplanes = scaled(64, width)
    shapes["conv1.weight"] = (inplanes, 3, 7, 7)
    bn("bn1", inplanes)
    for s, (planes, blocks) in enumerate(zip((64, 128, 256, 512),
                                             tuple(depth) or cfg["stage_sizes"]), 1):
        inner = scaled(planes * per_group // 64, width) * groups
        out = scaled(planes * 4, width)
        for b in range(blocks):
            p = f"layer{s}.{b}"
            shapes[f"{p}.conv1.weight"] = (inner, inplanes, 1, 1)
            bn(f"{p}.bn1", inner)
            shapes[f"{p}.conv2.weight"] = (inner, inner // groups, 3, 3)
            bn(f"{p}.bn2", inner)
            shapes[f"{p}.conv3.weight"] = (out, inner, 1, 1)
            bn(f"{p}.bn3", out)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1)
                bn(f"{p}.downsample.1", out)
            inplanes = out
    shapes["fc.weight"], shapes["fc.bias"] = (1000, inplanes), (1000,)
    return shapes


def torchvision_vgg16_shapes(width=1.0, depth=(2, 2, 3, 3, 3)):
    """Key -> shape of torchvision's ``vgg16`` state dict (``features.<i>`` convs with a
    ReLU after each and a max pool after each block; classifier.0/3/6 Linear)."""
    shapes, index, cin = {}, 0, 3
    for block, convs in enumerate(depth):
        cout = scaled((64, 128, 256, 512, 512)[block], width)
        for _ in range(convs):
            shapes[f"features.{index}.weight"] = (cout, cin, 3, 3)
            shapes[f"features.{index}.bias"] = (cout,)
            cin, index = cout, index + 2
        index += 1
    fc = scaled(4096, width)
    shapes.update({"classifier.0.weight": (fc, cin * 49), "classifier.0.bias": (fc,),
                   "classifier.3.weight": (fc, fc), "classifier.3.bias": (fc,),
                   "classifier.6.weight": (1000, fc), "classifier.6.bias": (1000,)})
    return shapes


def free_state(shapes):
    """Arrays of the right shapes that take no memory (zero strides)."""
    return {k: np.broadcast_to(np.int64(0) if k.endswith("tracked") else np.float32(0.5), s)
            for k, s in shapes.items()}


def random_state(shapes, seed=0):
    """Random weights in torchvision's layout: He-normal convs, positive variances."""
    rng = np.random.default_rng(seed)
    state = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            state[k] = np.array(7, np.int64)
        elif k.endswith("running_var"):
            state[k] = rng.uniform(0.5, 1.5, s).astype(np.float32)
        elif k.endswith("weight") and len(s) > 1:
            state[k] = (rng.normal(size=s) * np.sqrt(2 / np.prod(s[1:]))).astype(np.float32)
        elif k.endswith("weight"):                     # BN scale
            state[k] = rng.uniform(0.5, 1.5, s).astype(np.float32)
        else:
            state[k] = rng.normal(0, 0.2, s).astype(np.float32)
    return state


@pytest.mark.parametrize("arch, count", [
    ("vgg16", 138_357_544), ("resnet50", 25_557_032), ("resnet101", 44_549_160),
    ("resnext101_32x4d", 44_177_704), ("resnext101_32x8d", 88_791_336)])
def test_full_size_torchvision_state_dicts_map_onto_the_models(arch, count):
    """Every torchvision key of the full-size nets (sizes: the published parameter counts)
    maps to a model array of the right shape; only the classifier and counters are left."""
    shapes = (torchvision_vgg16_shapes() if arch == "vgg16"
              else torchvision_resnet_shapes(arch))
    assert sum(int(np.prod(s)) for k, s in shapes.items() if "running" not in k and
               "tracked" not in k) == count
    tree, report = pretrained.convert(free_state(shapes), source="torchvision", arch=arch)
    targets = pretrained.target_shapes(arch)
    got = traverse_util.flatten_dict({k: tree[k] for k in ("params", "batch_stats")})
    assert {p: v.shape for p, v in got.items()} == targets
    ignored = {k for k in report["ignored"] if "tracked" not in k}
    assert ignored == ({"classifier.6.weight", "classifier.6.bias"} if arch == "vgg16"
                       else {"fc.weight", "fc.bias"})
    assert tree["meta"]["stride_in_1x1"] == (None if arch == "vgg16" else False)
    if arch == "vgg16":
        assert tree["params"]["largefov"]["fc6"]["kernel"].shape == (3, 3, 512, 1024)
        assert tree["params"]["largefov"]["fc7"]["kernel"].shape == (1, 1, 1024, 1024)


def test_name_tables():
    assert pretrained.vgg_feature_indices() == {
        "conv1_1": 0, "conv1_2": 2, "conv2_1": 5, "conv2_2": 7, "conv3_1": 10, "conv3_2": 12,
        "conv3_3": 14, "conv4_1": 17, "conv4_2": 19, "conv4_3": 21, "conv5_1": 24,
        "conv5_2": 26, "conv5_3": 28}
    tv = pretrained.torchvision_name
    assert tv(("params", "backbone", "layer3_22", "downsample_conv", "kernel")) == \
        "layer3.22.downsample.0.weight"
    assert tv(("batch_stats", "backbone", "layer1_0", "bn_downsample", "var")) == \
        "layer1.0.downsample.1.running_var"
    assert tv(("params", "largefov", "fc7", "bias")) == "classifier.3.bias"
    kn = pretrained.keras_name
    assert kn(("params", "backbone", "conv5_3", "kernel")) == "block5_conv3/kernel"
    assert kn(("params", "backbone", "bn1", "scale")) == "conv1_bn/gamma"
    assert kn(("batch_stats", "backbone", "layer4_2", "bn3", "mean")) == \
        "conv5_block3_3_bn/moving_mean"
    assert kn(("params", "backbone", "layer2_0", "downsample_conv", "kernel")) == \
        "conv3_block1_0_conv/kernel"


# ============================================================ readers


def test_torch_formats_and_safetensors_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    plain = {"conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
             "half": rng.normal(size=(5,)).astype(np.float16),
             "brain": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16),
             "bn.num_batches_tracked": np.array(123456789012, np.int64)}
    tensors, storages = as_storages(plain)
    # A transposed view and a slice at an offset of one shared storage, as torch keeps them.
    shared = rng.normal(size=12).astype(np.float32)
    storages["s"] = shared
    tensors["fc.weight"] = ("s", 0, (4, 3), (1, 4))     # shared.reshape(3, 4).T
    tensors["fc.bias"] = ("s", 8, (4,), (1,))
    expected = dict(plain, **{"fc.weight": shared.reshape(3, 4).T, "fc.bias": shared[8:]})
    save_torch_zip(tmp_path / "a.pth", tensors, storages)
    save_torch_legacy(tmp_path / "b.pth", tensors, storages)
    save_safetensors(tmp_path / "c.safetensors", expected)
    for name in ("a.pth", "b.pth", "c.safetensors"):
        got = pretrained.read_torch(str(tmp_path / name))
        assert set(got) == set(expected), name
        for k, v in expected.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, (name, k)
            np.testing.assert_array_equal(got[k], v, err_msg=f"{name} {k}")


@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval"),
                                          ("torch", "load")])
def test_pickles_with_other_globals_are_refused(tmp_path, module, name):
    marker = tmp_path / "ran"
    evil = (b"\x80\x02" + TorchPickle.glob(module, name) + b"(" +
            TorchPickle.string(f"touch {marker}" if name == "system" else "1+1") + b"tR.")
    path = tmp_path / "evil.pth"
    save_torch_zip(path, {}, {}, pickle_bytes=evil)
    with pytest.raises(UnsafePickleError, match=rf"{path}.*{module}\.{name}"):
        pretrained.read_torch(str(path))
    # The same global where torch puts _rebuild_tensor_v2, in both containers.
    tensors, storages = as_storages({"w": np.ones(2, np.float32)})
    sneaky = TorchPickle(legacy=False, globals_override=(module, name)).dumps(tensors, storages)
    save_torch_zip(path, tensors, storages, pickle_bytes=sneaky)
    with pytest.raises(UnsafePickleError, match=rf"{module}\.{name}"):
        pretrained.read_torch(str(path))
    assert not marker.exists()


def test_truncated_and_unknown_files_are_named(tmp_path):
    state = {"w": np.arange(64, dtype=np.float32)}
    save_torch_zip(tmp_path / "z.pth", state)
    save_torch_legacy(tmp_path / "l.pth", state)
    save_safetensors(tmp_path / "s.safetensors", state)
    for name in ("z.pth", "l.pth", "s.safetensors"):
        path = tmp_path / name
        blob = path.read_bytes()
        path.write_bytes(blob[:len(blob) - 40])
        with pytest.raises(WeightsError, match=rf"{path}.*(truncated|corrupt)"):
            pretrained.read_torch(str(path))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, not weights")
    with pytest.raises(WeightsError, match=rf"{junk}: unknown weight format"):
        pretrained.read_torch(str(junk))
    save_safetensors(tmp_path / "ok.safetensors", state)
    with pytest.raises(WeightsError, match="not Keras weights"):
        pretrained.read_keras(str(tmp_path / "ok.safetensors"))


def test_safetensors_reader_reads_files_of_the_safetensors_package(tmp_path):
    """A file written by ``safetensors.numpy.save_file`` comes back with its names,
    dtypes, shapes and values (compared element by element with the arrays written),
    through `read_safetensors` and through the ``--from=torchvision`` reader."""
    rng = np.random.default_rng(3)
    state = {"layer1.0.conv1.weight": rng.normal(size=(8, 4, 1, 1)).astype(np.float32),
             "bn1.running_var": rng.uniform(0.5, 1.5, 4).astype(np.float64),
             "scalar": np.array(-7, np.int32),
             "mask": np.array([True, False, True]),
             "brain": rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16),
             "empty": np.zeros((0, 3), np.float16)}
    path = str(tmp_path / "w.safetensors")
    safetensors_numpy.save_file(state, path, metadata={"format": "pt"})
    assert pretrained.sniff(path) == "safetensors"
    for got in (pretrained.read_safetensors(path), pretrained.read_weights(path, "torchvision")):
        assert sorted(got) == sorted(state)                  # no '__metadata__' entry
        for k, v in state.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            np.testing.assert_array_equal(got[k], v, err_msg=k)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 8) + b'{"a": 1}')
    with pytest.raises(WeightsError, match=f"{bad}: truncated or corrupt safetensors"):
        pretrained.read_safetensors(str(bad))


# ============================================================ numpy reference (NCHW)


def np_conv(x, w, stride=1, pad=0, dilation=1, groups=1, bias=None):
    """torch.nn.functional.conv2d in numpy: ``x [N, C, H, W]``, ``w [O, C/groups, kh, kw]``."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh = (h - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, o, oh, ow))
    og = o // groups
    for g in range(groups):
        xg, wg = x[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i * dilation:i * dilation + stride * (oh - 1) + 1:stride,
                           j * dilation:j * dilation + stride * (ow - 1) + 1:stride]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, wg[:, :, i, j])
    return out if bias is None else out + bias[None, :, None, None]


def np_bn(x, sd, p):
    r = lambda k: sd[f"{p}.{k}"][None, :, None, None].astype(np.float64)  # noqa: E731
    return (x - r("running_mean")) / np.sqrt(r("running_var") + 1e-5) * r("weight") + r("bias")


def np_maxpool3x3s2(x):
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h, w = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
    return np.max([x[:, :, i:i + 2 * h - 1:2, j:j + 2 * w - 1:2]
                   for i in range(3) for j in range(3)], axis=0)


def np_bottleneck(x, sd, p, stride, groups):
    """torchvision's Bottleneck: stride on the 3x3 conv."""
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    y = relu(np_bn(np_conv(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
    y = relu(np_bn(np_conv(y, sd[f"{p}.conv2.weight"], stride, 1, groups=groups), sd,
                   f"{p}.bn2"))
    y = np_bn(np_conv(y, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
    if f"{p}.downsample.0.weight" in sd:
        x = np_bn(np_conv(x, sd[f"{p}.downsample.0.weight"], stride), sd, f"{p}.downsample.1")
    return relu(y + x)


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


# ============================================================ torchvision: forward parity


@pytest.mark.parametrize("arch, width, containers", [
    ("resnet50", 1 / 16, ("w.pth", "w.safetensors")), ("resnext101_32x8d", 1 / 4, ("old.pth",))])
def test_torchvision_resnet_matches_numpy_reference(tmp_path, arch, width, containers):
    """Stem + layer1.0 + layer2.0 (stride 2 on the 3x3, grouped for ResNeXt) of a reduced
    net in torchvision's names, read from real containers, against numpy."""
    depth = (1, 1, 1, 1)
    sd = random_state(torchvision_resnet_shapes(arch, width, depth))
    trees = []
    for name in containers:
        path = str(tmp_path / name)
        {"w.pth": save_torch_zip, "old.pth": save_torch_legacy,
         "w.safetensors": save_safetensors}[name](path, sd)
        trees.append(pretrained.convert(pretrained.read_torch(path), source="torchvision",
                                     arch=arch, width=width, depth=depth, name=path)[0])
        jax.tree.map(np.testing.assert_array_equal, trees[-1]["params"], trees[0]["params"])
    tree = trees[0]
    model = resnet.resnet(arch, width=width, depth=depth, output_stride=32)
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                             mutable=["intermediates"])[1]["intermediates"])
    inter = apply({"params": tree["params"]["backbone"],
                   "batch_stats": tree["batch_stats"]["backbone"]}, x)
    groups = resnet.ARCHITECTURES[arch].get("groups", 1)
    stem = np_maxpool3x3s2(np.maximum(np_bn(np_conv(nchw(x), sd["conv1.weight"], 2, 3),
                                            sd, "bn1"), 0))
    layer1 = np_bottleneck(stem, sd, "layer1.0", 1, groups)
    layer2 = np_bottleneck(layer1, sd, "layer2.0", 2, groups)
    assert rel_error(nchw(inter["layer1_0"]["__call__"][0]), layer1) < 1e-5
    assert rel_error(nchw(inter["layer2_0"]["__call__"][0]), layer2) < 1e-5


def test_torchvision_vgg16_convs_and_largefov_surgery(tmp_path):
    """Every features.<i> lands on its conv; conv1_1 runs as torch's; fc6/fc7 become
    DeepLab's LargeFOV layers: fc6 output o = old filter 4o at taps (0, 3, 6) of its 7x7,
    dilation 12; fc7 keeps every 4th input and output."""
    width = 1 / 16
    sd = random_state(torchvision_vgg16_shapes(width))
    path = str(tmp_path / "vgg16.pth")
    save_torch_zip(path, sd)
    tree, _ = pretrained.convert(pretrained.read_torch(path), source="torchvision", arch="vgg16",
                              width=width, name=path)
    backbone = tree["params"]["backbone"]
    for name, index in zip(
            ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
             "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"],
            [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]):
        np.testing.assert_array_equal(backbone[name]["kernel"],
                                      sd[f"features.{index}.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(backbone[name]["bias"], sd[f"features.{index}.bias"])
    x = np.random.default_rng(1).normal(size=(1, 16, 16, 3)).astype(np.float32)
    ours = layers.conv(4, 3, use_bias=True).apply({"params": backbone["conv1_1"]}, x)  # as VGG16
    conv1_1 = np_conv(nchw(x), sd["features.0.weight"], 1, 1, bias=sd["features.0.bias"])
    assert rel_error(nchw(ours), conv1_1) < 1e-5

    head = heads.LargeFOVHead(num_classes=2, width=width)
    feats = np.random.default_rng(2).normal(size=(1, 25, 25, 32)).astype(np.float32)
    params = dict(tree["params"]["largefov"],
                  fc8={"kernel": np.zeros((1, 1, 64, 2), np.float32),
                       "bias": np.zeros(2, np.float32)})
    fc7 = head.apply({"params": params}, feats, train=False)["features"][0, 12, 12]
    w6, b6 = sd["classifier.0.weight"], sd["classifier.0.bias"]     # [256, 32 * 7 * 7]
    fc6 = np.array([b6[4 * o] + sum(
        w6[4 * o, c * 49 + 7 * (3 * i) + 3 * j] * feats[0, 12 + 12 * (i - 1), 12 + 12 * (j - 1), c]
        for i in range(3) for j in range(3) for c in range(32)) for o in range(64)])
    w7, b7 = sd["classifier.3.weight"], sd["classifier.3.bias"]
    ref = np.maximum(b7[::4] + w7[::4, ::4] @ np.maximum(fc6, 0), 0)
    assert rel_error(fc7, ref) < 1e-5


def test_input_normalisation_is_folded_into_the_first_conv():
    """For a pipeline mean/std other than the source's, conv1(our input) equals the
    source's conv1(its input) + the folded shift, away from the border; exactly so with
    BGR + caffe mean (keras), including the channel flip."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
    pixels = rng.uniform(0, 255, size=(1, 3, 12, 12))               # RGB, NCHW
    mean, std = np.array([120.0, 110.0, 100.0]), np.array([60.0, 55.0, 50.0])
    ours = (pixels - mean[:, None, None]) / std[:, None, None]
    for name, conv in pretrained.INPUT_CONVENTIONS.items():
        order = [2, 1, 0] if conv.bgr else [0, 1, 2]
        theirs = ((pixels[:, order] - np.array(conv.mean)[:, None, None]) /
                  np.array(conv.std)[:, None, None])
        folded, shift = pretrained.fold_input_convention(kernel, conv, mean, std)
        ref = np_conv(theirs, kernel.transpose(3, 2, 0, 1))
        got = np_conv(ours, folded.transpose(3, 2, 0, 1)) + shift[None, :, None, None]
        assert rel_error(got, ref) < 1e-6, name
    folded, shift = pretrained.fold_input_convention(
        kernel, pretrained.INPUT_CONVENTIONS["torchvision"], config_lib.IMAGENET_MEAN,
        config_lib.IMAGENET_STD)
    np.testing.assert_array_equal(folded, kernel)                    # identity
    assert not shift.any()


def test_wrong_arch_missing_and_misshapen_keys_are_named():
    r50, r101 = (torchvision_resnet_shapes(a) for a in ("resnet50", "resnet101"))
    kw = dict(source="torchvision", name="w.pth")
    with pytest.raises(WeightsError, match=r"w.pth: key 'layer3.6.bn1.running_mean' \(for "
                                           r"batch_stats/backbone/layer3_6/bn1/mean\) is "
                                           r"missing, and 254 more keys resnet101 needs"):
        pretrained.convert(free_state(r50), arch="resnet101", **kw)
    with pytest.raises(WeightsError, match=r"w.pth: .*keys are not used by resnet50.*"
                                           r"'layer3.10.bn1.bias'"):
        pretrained.convert(free_state(r101), arch="resnet50", **kw)
    with pytest.raises(WeightsError, match=r"w.pth: key 'layer1.0.bn1.running_mean' has shape "
                                           r"\(256,\), but resnet101's batch_stats/backbone/"
                                           r"layer1_0/bn1/mean needs \(64,\)"):
        pretrained.convert(free_state(torchvision_resnet_shapes("resnext101_32x8d")),
                        arch="resnet101", **kw)
    broken = free_state(r50)
    del broken["layer2.0.downsample.1.running_var"]
    with pytest.raises(WeightsError, match=r"'layer2.0.downsample.1.running_var' \(for "
                                           r"batch_stats/backbone/layer2_0/bn_downsample/var"):
        pretrained.convert(broken, arch="resnet50", **kw)
    with pytest.raises(WeightsError, match="'bn1.running_mean'.* is missing.*none of the "
                                           "keys resnet50 needs"):
        pretrained.convert(free_state(torchvision_vgg16_shapes()), arch="resnet50", **kw)
    with pytest.raises(WeightsError, match="keras.applications has no resnext101_32x8d"):
        pretrained.convert({}, source="keras", arch="resnext101_32x8d")
    with pytest.raises(SystemExit):
        convert.parse_args(["--from=caffe", "--arch=vgg16", "a", "b"])


# ============================================================ Keras: parity


KERAS_WARNINGS = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


def randomise(model, seed=0):
    """Random conv/dense biases and BN statistics (Keras initialises them to 0 / 1)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if type(layer).__name__ == "BatchNormalization":
            c = ws[0].shape
            ws = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c),
                  rng.uniform(0.5, 1.5, c)]
        elif len(ws) == 2:
            ws = [ws[0], rng.normal(0, 0.1, ws[1].shape)]
        layer.set_weights([np.asarray(w, np.float32) for w in ws])


def pixels(size=64, seed=3):
    return np.random.default_rng(seed).uniform(0, 255, (1, size, size, 3)).astype(np.float32)


def normalise(rgb, mean, std):
    return ((rgb - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(
        np.float32)


def deeplab_vgg_in_keras(keras, app):
    """keras.applications VGG16's own conv layers wired as DeepLab-LargeFOV's trunk: 3x3
    pools with padding 1 (stride 2, 2, 2, 1, 1), conv5 dilated 2 (copies of the block5
    layers with dilation_rate=2), and pool5a (3x3 average, padding counted)."""
    L = keras.layers
    x = inputs = keras.Input((None, None, 3))
    for block, convs in enumerate((2, 2, 3, 3, 3), start=1):
        for i in range(1, convs + 1):
            layer = app.get_layer(f"block{block}_conv{i}")
            if block == 5:
                dilated = L.Conv2D(layer.filters, 3, padding="same", dilation_rate=2,
                                   activation="relu")
                x = dilated(x)
                dilated.set_weights(layer.get_weights())
            else:
                x = layer(x)
        x = L.MaxPooling2D(3, strides=2 if block <= 3 else 1)(L.ZeroPadding2D(1)(x))
    x = L.AveragePooling2D(3, strides=1)(L.ZeroPadding2D(1)(x))
    return keras.Model(inputs, x)


@KERAS_WARNINGS
def test_keras_vgg16_parity(tmp_path, keras):
    """The converted VGG16 trunk reproduces Keras' (its own conv layers in DeepLab's
    layout) from raw pixels: Keras on preprocess_input (BGR, caffe mean), ours on the
    pipeline's RGB mean/std normalisation. Three Keras containers give the same arrays."""
    app = keras.applications.VGG16(weights=None, include_top=False)
    randomise(app)
    app.save(tmp_path / "vgg16.h5")                 # legacy full-model HDF5
    app.save(tmp_path / "vgg16.keras")              # Keras 3 zip
    from keras.src.legacy.saving import legacy_h5_format  # the download's layout
    import h5py
    with h5py.File(tmp_path / "vgg16_notop.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, app)
    # Keras 1 names (block1_conv1_W_1:0, block1_conv1_b_1:0), as in old downloads.
    with h5py.File(tmp_path / "vgg16_notop.h5", "r") as f, \
            h5py.File(tmp_path / "vgg16_keras1.h5", "w") as g:
        g.attrs["layer_names"] = f.attrs["layer_names"]
        text = lambda n: n.decode() if isinstance(n, bytes) else str(n)  # noqa: E731
        for layer in map(text, f.attrs["layer_names"]):
            group = g.create_group(layer)
            names = [text(n) for n in f[layer].attrs["weight_names"]]
            new = [f"{layer}_{'Wb'[i]}_1:0" for i in range(len(names))]
            group.attrs["weight_names"] = [n.encode() for n in new]
            for old_name, new_name in zip(names, new):
                group[new_name] = f[layer][old_name][()]
    read = {n: pretrained.read_keras(str(tmp_path / n))
            for n in ("vgg16.h5", "vgg16.keras", "vgg16_notop.h5", "vgg16_keras1.h5")}
    assert len(read["vgg16.h5"]) == 26 and "block5_conv3/kernel" in read["vgg16.h5"]
    for name, arrays in read.items():
        assert arrays.keys() == read["vgg16.h5"].keys(), name
        for k in arrays:
            np.testing.assert_array_equal(arrays[k], read["vgg16.h5"][k], err_msg=name)

    rgb = pixels()
    ref = np.asarray(deeplab_vgg_in_keras(keras, app)(
        keras.applications.vgg16.preprocess_input(rgb.copy())))
    dst = str(tmp_path / "vgg16.msgpack")
    assert convert.main(["--from=keras", "--arch=vgg16",
                         f"--mean={','.join(map(str, CAFFE_MEAN_RGB))}",
                         str(tmp_path / "vgg16.keras"), dst]) == 0
    trees = {"caffe": pretrained.read_pretrained(dst),
             "imagenet": pretrained.convert(read["vgg16.h5"], source="keras", arch="vgg16")[0]}
    errors = {}
    for label, mean in (("caffe", CAFFE_MEAN_RGB), ("imagenet", config_lib.IMAGENET_MEAN)):
        assert "largefov" not in trees[label]["params"]    # include_top=False: no fc layers
        ours = vgg.VGG16().apply({"params": trees[label]["params"]["backbone"]},
                                 normalise(rgb, mean, config_lib.IMAGENET_STD), train=False)
        errors[label] = rel_error(ours, ref)
    print("keras vgg16 relative errors:", errors)
    assert errors["caffe"] < 1e-4          # same mean as the source: exact up to rounding
    assert errors["imagenet"] < 2e-2       # padding differs by < 0.5 grey levels


@KERAS_WARNINGS
@pytest.mark.parametrize("arch, container", [("resnet50", "keras"), ("resnet101", None)])
def test_keras_resnet_parity(tmp_path, keras, arch, container):
    """keras.applications ResNet (Caffe layout: stride on the 1x1, conv biases, BN eps
    1.001e-5) -> our ResNet with stride_in_1x1: conv5 output at output stride 32.
    (ResNet-101's arrays are taken from the model by name, ``layer/variable``, to save
    the time of a 170 MB file; ResNet-50 goes through a .keras file.)"""
    app = getattr(keras.applications, {"resnet50": "ResNet50", "resnet101": "ResNet101"}[arch])(
        weights=None, include_top=False, input_shape=(64, 64, 3))
    randomise(app)
    if container:
        path = str(tmp_path / f"{arch}.{container}")
        app.save(path)
        arrays = pretrained.read_keras(path)
    else:
        path, arrays = arch, {w.path: np.asarray(w) for w in app.weights}
    rgb = pixels()
    ref = np.asarray(app(keras.applications.resnet.preprocess_input(rgb.copy())))
    tree, report = pretrained.convert(arrays, source="keras", arch=arch, mean=CAFFE_MEAN_RGB,
                                   name=path)
    assert tree["meta"]["stride_in_1x1"] is True and not report["ignored"]
    model = resnet.resnet(arch, output_stride=32, stride_in_1x1=True)
    ours = model.apply({"params": tree["params"]["backbone"],
                        "batch_stats": tree["batch_stats"]["backbone"]},
                       normalise(rgb, CAFFE_MEAN_RGB, config_lib.IMAGENET_STD), train=False)
    error = rel_error(ours, ref)
    print(f"keras {arch} relative error: {error:.2e}")
    assert ours.shape == ref.shape == (1, 2, 2, 2048)
    assert error < 1e-4


@KERAS_WARNINGS
def test_keras_dense_and_torch_linear_are_the_7x7_convs(keras):
    """Keras flattens pool5 as (H, W, C), torch as (C, H, W): both fc6 layouts equal a
    7x7 VALID conv with the converted kernel."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 7, 7, 6)).astype(np.float32)
    dense = keras.Sequential([keras.Input((7, 7, 6)), keras.layers.Flatten(),
                              keras.layers.Dense(5)])
    ref = np.asarray(dense(x))[0] - dense.layers[-1].get_weights()[1]
    conv = lambda k: np.einsum("hwc,hwco->o", x[0], k)  # noqa: E731
    kernel = pretrained.fc_as_conv_from_keras(dense.layers[-1].get_weights()[0], 7)
    assert rel_error(conv(kernel), ref) < 1e-5
    w = rng.normal(size=(5, 6 * 49)).astype(np.float32)               # torch Linear
    ref = w @ x[0].transpose(2, 0, 1).reshape(-1)
    assert rel_error(conv(pretrained.fc_as_conv_from_torch(w, 7)), ref) < 1e-5


# ============================================================ init_from: a run


def tiny_config(init_from="scratch"):
    c = config_lib.recipe("demo")
    c.model.width, c.model.fc_width, c.model.depth = 1 / 16, 1024, (1, 1, 1, 1, 1)
    c.model.vgg_batch_norm = False  # DeepLab's VGG16, the layout the converter writes
    c.data.crop_size = 33
    c.model.init_from = init_from
    return c


def tiny_vgg_file(tmp_path, config):
    """A reduced VGG16 in torchvision's layout, converted for ``config``'s pipeline."""
    depth = tuple(config.model.depth)
    sd = random_state(torchvision_vgg16_shapes(config.model.width, depth))
    tree, _ = pretrained.convert(sd, source="torchvision", arch="vgg16", width=config.model.width,
                              depth=depth, mean=config.data.mean, std=config.data.std)
    path = str(tmp_path / "tiny_vgg16.msgpack")
    pretrained.save_pretrained(path, tree)
    return path, tree


def test_init_from_loads_backbone_and_fc6_fc7_and_keeps_the_heads(tmp_path):
    """`experiment.initial_state` with model.init_from: the file's arrays replace the fresh
    backbone and fc6/fc7; fc8 and the attention head keep their initialisation (the
    fresh state of the same key, built without the file)."""
    config = tiny_config()
    path, tree = tiny_vgg_file(tmp_path, config)
    config.model.init_from = path
    run = experiment.setup_run(config)
    state = experiment.initial_state(run, jax.random.PRNGKey(0))
    fresh = experiment.initial_state(run, jax.random.PRNGKey(0), pretrained_start=False)
    flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])  # noqa: E731
    loaded = flat({"backbone": tree["params"]["backbone"],
                   "largefov": tree["params"]["largefov"]})
    for p, v in flat(state.params["net"]).items():
        if p in loaded:
            np.testing.assert_array_equal(v, loaded[p])
        else:                                               # fc8 keeps its initialisation
            assert p[0].key == "largefov" and p[1].key == "fc8"
            np.testing.assert_array_equal(v, flat(fresh.params["net"])[p])
    jax.tree.map(np.testing.assert_array_equal, state.params["attention"],
                 fresh.params["attention"])
    _, report = pretrained.merge_pretrained({"params": fresh.params}, tree, path)
    assert len(report["loaded"]) == len(loaded) and not report["unused"]
    assert pretrained.summarise(report["loaded"]) == (
        "net/backbone (10 arrays), net/largefov/fc6 (2 arrays), net/largefov/fc7 (2 arrays)")
    assert sorted(pretrained.summarise(report["fresh"]).split(", ")) == [
        "attention/conv1 (2 arrays)", "attention/conv2 (2 arrays)", "net/largefov/fc8 (2 arrays)"]


def test_init_from_errors_name_the_key(tmp_path):
    config = tiny_config()
    path, tree = tiny_vgg_file(tmp_path, config)
    model = build_model(config.model)
    variables = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 33, 33, 3)), train=False))
    check = lambda c: pretrained.check_meta(tree["meta"], c, path)  # noqa: E731
    check(config)
    other = tiny_config()
    other.model.backbone = "resnet50"
    with pytest.raises(WeightsError, match="holds vgg16 weights but config.model.backbone="):
        check(other)
    other = tiny_config()
    other.data.mean = config_lib.IMAGENET_MEAN
    with pytest.raises(WeightsError, match=r"data.mean=\(127.5.*--mean=123.675,116.28,103.53"):
        check(other)
    keras_meta = dict(tree["meta"], arch="resnet50", source="keras", stride_in_1x1=True)
    other.model.backbone, other.data.mean = "resnet50", config.data.mean
    with pytest.raises(WeightsError, match="stride_in_1x1=True"):
        pretrained.check_meta(keras_meta, other, path)

    wide = tiny_config()
    wide.model.width = 1 / 8
    wide_vars = jax.eval_shape(lambda: build_model(wide.model).init(
        jax.random.key(0), jnp.zeros((1, 33, 33, 3)), train=False))
    with pytest.raises(WeightsError, match=r"key params/backbone/conv1_1/bias has shape \(4,\)"
                                           r" but the model's params/net/backbone/conv1_1/bias"):
        pretrained.merge_pretrained(wide_vars, tree, path)
    partial = {"params": {"backbone": dict(tree["params"]["backbone"])}}
    del partial["params"]["backbone"]["conv3_1"]
    with pytest.raises(WeightsError, match="params/net/backbone/conv3_1/.* is missing from"):
        pretrained.merge_pretrained(variables, partial, path)
    pretrained.merge_pretrained(variables, tree, path)         # the intact file fits

    with pytest.raises(WeightsError, match="does not exist; convert ImageNet weights"):
        pretrained.read_pretrained(str(tmp_path / "nope.msgpack"))
    blob = open(path, "rb").read()
    cut = tmp_path / "cut.msgpack"
    cut.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(WeightsError, match=f"{cut}: not a converted weight file or truncated"):
        pretrained.read_pretrained(str(cut))
