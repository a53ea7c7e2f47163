"""The PyTorch peer of scaleattn's model, timed the way ``--mode=bench`` times JAX.

    python -m benchmarks.torch_peer --config=configs/voc_r101.py \\
        [--config.model.width=0.25 ...] [--compile] [--output=peer.json]

Reads the same config files and ``--config.*`` overrides as ``scaleattn.main`` (only
`scaleattn.config`, which needs no JAX) and builds the same network in plain
``torch.nn``: VGG16-LargeFOV or ResNet/ResNeXt (torchvision's layouts: stride on the
3x3 conv, bottleneck widths, stem) dilated to output stride 8/16 like
`scaleattn.models.resnet`, the LargeFOV or ASPP-v2 head, the share-net over
``model.scales`` with bilinear (align_corners) resizing, and the attention / avg / max
merge; the loss is CE (ignore 255) on the merged and, with extra supervision, every
scale's logits against nearest-resized labels; SGD with momentum, weight decay on
conv kernels, x10 learning rate for the new layers, frozen batch norm when
``model.bn_mode='frozen'``. torchvision is not needed (and not installable beside
every torch build), so the backbones are written out here; the parameter count is
reported so that `compare.py` can check it equals JAX's.

Speed options: bf16 by autocast (``model.dtype='bfloat16'`` rows of ``bench.dtypes``;
parameters stay fp32 as in Flax), ``channels_last`` memory format (default on),
``--compile`` for ``torch.compile`` (off by default: on a CPU it needs a C++
toolchain). Timing: ``bench.warmup`` untimed steps, then the median of
``bench.steps`` steps, each followed by a device synchronisation; the first step's
time (which includes ``torch.compile`` and cuDNN autotuning) is reported as the
compile time.
"""

import copy
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from absl import app, flags
from ml_collections import config_flags
from torch import nn

from scaleattn import config as config_lib  # no JAX needed

FLAGS = flags.FLAGS


def define_flags():
    """The command line (defined only when run as a script, so tests can import this)."""
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                    lock_config=True)
    flags.DEFINE_string("output", "torch_bench.json", "JSON file for the results.")
    flags.DEFINE_bool("compile", False, "Wrap the model in torch.compile.")
    flags.DEFINE_bool("channels_last", True, "Use the channels_last memory format.")
    flags.DEFINE_string("device", "", "torch device ('' = cuda if available, else cpu).")
    flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0 = torch's default).")
    flags.mark_flags_as_required(["config"])


IGNORE_LABEL = 255
VGG16_DEPTH = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
RESNETS = {  # stage sizes, groups, width per group (torchvision's)
    "resnet50": ((3, 4, 6, 3), 1, 64),
    "resnet101": ((3, 4, 23, 3), 1, 64),
    "resnext101_32x4d": ((3, 4, 23, 3), 32, 4),
    "resnext101_32x8d": ((3, 4, 23, 3), 32, 8),
}
STAGE_STRIDES = {16: ((1, 1), (2, 1), (2, 1), (1, 2)), 8: ((1, 1), (2, 1), (1, 2), (1, 4)),
                 32: ((1, 1), (2, 1), (2, 1), (2, 1))}
NEW_LAYERS = ("fc8", "aspp", "attention")


def scaled(channels: int, width: float) -> int:
    return max(1, int(channels * width))


def conv(cin, cout, k, *, stride=1, dilation=1, groups=1, bias=False) -> nn.Conv2d:
    """Symmetric padding ``dilation * (k - 1) // 2``, as `scaleattn.models.layers.conv`."""
    return nn.Conv2d(cin, cout, k, stride, dilation * (k - 1) // 2, dilation, groups, bias)


# ---------------------------------------------------------------------- models ---


class VGG16(nn.Module):
    """DeepLab-LargeFOV's VGG16 trunk: output stride 8, conv5 dilated 2, pool5a."""

    def __init__(self, width: float, depth=()):
        super().__init__()
        self.plan, cin = [], 3
        for block, (convs, channels) in enumerate(zip(depth or VGG16_DEPTH, VGG16_WIDTHS), 1):
            cout = scaled(channels, width)
            for i in range(1, convs + 1):
                self.add_module(f"conv{block}_{i}", conv(
                    cin, cout, 3, dilation=2 if block == 5 else 1, bias=True))
                self.plan.append(f"conv{block}_{i}")
                cin = cout
            self.plan.append(2 if block <= 3 else 1)  # a max pool of this stride
        self.out_channels = cin

    def forward(self, x):
        for step in self.plan:
            x = (F.max_pool2d(x, 3, step, 1) if isinstance(step, int)
                 else F.relu(getattr(self, step)(x)))
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)  # pool5a


class Bottleneck(nn.Module):
    def __init__(self, cin, inner, cout, *, stride, dilation, groups):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, inner, 1), nn.BatchNorm2d(inner)
        self.conv2 = conv(inner, inner, 3, stride=stride, dilation=dilation, groups=groups)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3, self.bn3 = conv(inner, cout, 1), nn.BatchNorm2d(cout)
        self.downsample_conv = self.bn_downsample = None
        if stride != 1 or cin != cout:
            self.downsample_conv = conv(cin, cout, 1, stride=stride)
            self.bn_downsample = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.downsample_conv is not None:
            x = self.bn_downsample(self.downsample_conv(x))
        return F.relu(y + x)


class ResNet(nn.Module):
    """torchvision's ResNet v1.5 / ResNeXt trunk, dilated like `scaleattn.models.resnet`
    (every block of a dilated stage at the stage's full rate, multi-grid on the last)."""

    def __init__(self, arch: str, width: float, depth=(), output_stride=8, multi_grid=()):
        super().__init__()
        stage_sizes, groups, width_per_group = RESNETS[arch]
        stage_sizes = tuple(depth) or stage_sizes
        cin = scaled(64, width)
        self.conv1, self.bn1 = conv(3, cin, 7, stride=2), nn.BatchNorm2d(cin)
        self.blocks = []
        for stage, (planes, n, (stride, rate)) in enumerate(
                zip((64, 128, 256, 512), stage_sizes, STAGE_STRIDES[output_stride])):
            inner = scaled(planes * width_per_group // 64, width) * groups
            cout = scaled(planes * 4, width)
            grid = tuple(multi_grid) if (multi_grid and stage == 3) else (1,) * n
            for b in range(n):
                name = f"layer{stage + 1}_{b}"
                self.add_module(name, Bottleneck(cin, inner, cout,
                                                 stride=stride if b == 0 else 1,
                                                 dilation=rate * grid[b], groups=groups))
                self.blocks.append(name)
                cin = cout
        self.out_channels = cin

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for name in self.blocks:
            x = getattr(self, name)(x)
        return x


class LargeFOVHead(nn.Module):
    def __init__(self, cin, num_classes, *, fc_width, dilation, dropout):
        super().__init__()
        self.fc6 = conv(cin, fc_width, 3, dilation=dilation, bias=True)
        self.fc7 = conv(fc_width, fc_width, 1, bias=True)
        self.fc8 = conv(fc_width, num_classes, 1, bias=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = self.drop(F.relu(self.fc6(x)))
        x = self.drop(F.relu(self.fc7(x)))
        return self.fc8(x), x


class ASPPv2Head(nn.Module):
    def __init__(self, cin, num_classes, rates):
        super().__init__()
        self.rates = tuple(rates)
        for r in self.rates:
            self.add_module(f"aspp_r{r}", conv(cin, num_classes, 3, dilation=r, bias=True))

    def forward(self, x):
        return sum(getattr(self, f"aspp_r{r}")(x) for r in self.rates), x


class SegmentationNet(nn.Module):
    """Backbone + head; the head's attribute is named like the Flax module
    (``largefov`` / ``aspp_v2``) so that parameter names match (`load_flax`)."""

    def __init__(self, m):
        super().__init__()
        if (m.head, m.backbone == "vgg16") not in (("largefov", True), ("aspp_v2", False)):
            raise ValueError(f"the peer has VGG16-LargeFOV and ResNet-ASPP-v2, not "
                             f"{m.backbone}/{m.head}")
        if m.backbone == "vgg16":
            self.backbone = VGG16(m.width, tuple(m.depth))
            head = LargeFOVHead(self.backbone.out_channels, m.num_classes,
                                fc_width=scaled(m.fc_width, m.width),
                                dilation=m.fc6_dilation, dropout=m.dropout)
            self.feature_channels = scaled(m.fc_width, m.width)
        else:
            self.backbone = ResNet(m.backbone, m.width, tuple(m.depth), m.output_stride,
                                   tuple(m.multi_grid))
            head = ASPPv2Head(self.backbone.out_channels, m.num_classes, tuple(m.aspp_rates))
            self.feature_channels = self.backbone.out_channels
        self.head_name = m.head
        self.add_module(m.head, head)

    def forward(self, x):
        return getattr(self, self.head_name)(self.backbone(x))


class AttentionHead(nn.Module):
    """conv3x3 -> ReLU -> dropout -> conv1x1(S); softmax over S by the caller."""

    def __init__(self, cin, hidden, num_scales, dropout):
        super().__init__()
        self.conv1 = conv(cin, hidden, 3, bias=True)
        self.conv2 = conv(hidden, num_scales, 1, bias=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.conv2(self.drop(F.relu(self.conv1(x))))


def load_flax(model: nn.Module, variables: dict) -> None:
    """Copies Flax variables (``{'params', 'batch_stats'}`` of the same config) into
    the peer. Names match module for module: torch ``a.b.weight`` is Flax
    ``params/a/b/kernel`` (HWIO -> OIHW) for a conv and ``.../scale`` for batch norm,
    ``bias`` is ``bias``, ``running_mean`` / ``running_var`` are ``batch_stats/.../mean``
    / ``var``. Raises KeyError naming a parameter either side lacks."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    def flatten(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            path = f"{prefix}/{key}" if prefix else key
            out.update(flatten(value, path) if isinstance(value, dict) else {path: value})
        return out
    params = flatten(dict(variables["params"]))
    stats = flatten(dict(variables.get("batch_stats", {})))
    used, state = set(), {}
    for key, tensor in model.state_dict().items():
        *path, leaf = key.split(".")
        base = "/".join(path)
        if leaf == "num_batches_tracked":
            continue
        source, name = {"weight": (params, "kernel" if tensor.dim() == 4 else "scale"),
                        "bias": (params, "bias"), "running_mean": (stats, "mean"),
                        "running_var": (stats, "var")}[leaf]
        value = np.asarray(source[f"{base}/{name}"], np.float32)
        used.add((id(source), f"{base}/{name}"))
        if tensor.dim() == 4:
            value = value.transpose(3, 2, 0, 1)
        if value.shape != tuple(tensor.shape):
            raise ValueError(f"{key}: torch {tuple(tensor.shape)}, Flax {value.shape}")
        state[key] = torch.from_numpy(np.array(value, np.float32))  # a writable copy
    unused = [k for tree in (params, stats) for k in tree if (id(tree), k) not in used]
    if unused:
        raise KeyError(f"Flax variables without a torch counterpart: {unused[:5]}")
    model.load_state_dict(state, strict=False)


def resize(x, size):
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(
        x, size=tuple(size), mode="bilinear", align_corners=True)


def scaled_size(size, scale):
    return tuple(int(math.ceil(s * scale - 1e-6)) for s in size)


class MultiScaleSegmenter(nn.Module):
    """``images [B, 3, H, W]`` -> (merged logits, list of per-scale logits), NCHW."""

    def __init__(self, m):
        super().__init__()
        self.scales, self.merge = tuple(m.scales), m.merge
        self.net = SegmentationNet(m)
        self.attention = None
        if m.merge == "attention" and len(self.scales) > 1:
            self.attention = AttentionHead(self.net.feature_channels * len(self.scales),
                                           max(1, int(m.attention_width * m.width)),
                                           len(self.scales), m.attention_dropout)

    def forward(self, images):
        size = images.shape[-2:]
        branches = [self.net(images if s == 1.0 else resize(images, scaled_size(size, s)))
                    for s in self.scales]
        out_size = branches[self.scales.index(1.0)][0].shape[-2:]
        logits = [resize(b[0], out_size) for b in branches]
        if len(self.scales) == 1:
            return logits[0], logits
        stacked = torch.stack(logits)                                  # [S, B, C, h, w]
        if self.merge == "max":
            return stacked.max(0).values, logits
        if self.merge == "avg":
            return stacked.mean(0), logits
        features = torch.cat([resize(b[1], out_size) for b in branches], 1)
        weights = torch.softmax(self.attention(features).float(), 1)  # [B, S, h, w]
        merged = torch.einsum("sbchw,bshw->bchw", stacked, weights.to(stacked.dtype))
        return merged, logits


# ------------------------------------------------------------------ train, eval ---


def nearest_labels(labels, size):
    """``[B, H, W]`` -> ``[B, h, w]``, picking ``round(i (H-1) / (h-1))`` (align corners)."""
    def index(n_in, n_out):
        if n_out == 1:
            return torch.zeros(1, dtype=torch.long, device=labels.device)
        return torch.round(torch.arange(n_out, device=labels.device) * (n_in - 1) /
                           (n_out - 1)).long()
    h, w = labels.shape[1:]
    if (h, w) == tuple(size):
        return labels
    return labels[:, index(h, size[0])][:, :, index(w, size[1])]


def segmentation_loss(merged, scale_logits, labels, extra_supervision: bool):
    target = nearest_labels(labels, merged.shape[-2:])

    def ce(logits):
        return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_LABEL)
    loss = ce(merged)
    if extra_supervision and len(scale_logits) > 1:
        loss = loss + sum(ce(l) for l in scale_logits)
    return loss


def make_optimizer(model, o, bn_frozen: bool):
    """SGD + momentum; weight decay on conv kernels; x new_layer_lr_mult for new layers."""
    bn_params = {id(p) for module in model.modules() if isinstance(module, nn.BatchNorm2d)
                 for p in module.parameters()}
    groups = {}
    for name, p in model.named_parameters():
        if bn_frozen and id(p) in bn_params:
            p.requires_grad_(False)
            continue
        new = any(tag in name for tag in NEW_LAYERS)
        decay = p.dim() == 4
        groups.setdefault((new, decay), []).append(p)
    return torch.optim.SGD(
        [{"params": ps, "lr": o.base_lr * (o.new_layer_lr_mult if new else 1.0),
          "weight_decay": o.weight_decay if decay else 0.0}
         for (new, decay), ps in groups.items()], lr=o.base_lr, momentum=o.momentum)


def set_train_mode(model, bn_frozen: bool):
    model.train()
    if bn_frozen:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call, device, *, steps, warmup):
    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def benchmark_dtype(config, dtype: str, device, *, compile_model: bool = False,
                    channels_last: bool = True) -> dict:
    """Times the train and eval steps of the peer of ``config`` in ``dtype``."""
    cfg = copy.deepcopy(config)
    m = cfg.model
    batch = cfg.bench.batch_size or cfg.batch_size
    size = cfg.bench.crop_size or cfg.data.crop_size
    torch.manual_seed(cfg.seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = MultiScaleSegmenter(m).to(device).to(memory_format=fmt)
    num_params = sum(p.numel() for p in model.parameters())
    bn_frozen = m.bn_mode == "frozen"
    optimizer = make_optimizer(model, cfg.optim, bn_frozen)
    step_model = torch.compile(model) if compile_model else model
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(batch, 3, size, size, generator=generator).to(
        device).contiguous(memory_format=fmt)
    labels = torch.randint(0, m.num_classes, (batch, size, size), generator=generator)
    labels[:, :2] = labels[:, -2:] = labels[:, :, :2] = labels[:, :, -2:] = IGNORE_LABEL
    labels = labels.to(device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16,
                    enabled=dtype == "bfloat16")

    def train_step():
        set_train_mode(model, bn_frozen)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            merged, scale_logits = step_model(images)
            loss = segmentation_loss(merged, scale_logits, labels, cfg.loss.extra_supervision)
        loss.backward()
        optimizer.step()
        return loss

    @torch.no_grad()
    def eval_step():
        model.eval()
        with torch.autocast(**autocast):
            merged, _ = step_model(images)
        prediction = resize(merged.float(), labels.shape[-2:]).argmax(1)
        valid = labels != IGNORE_LABEL
        index = labels[valid] * m.num_classes + prediction[valid]
        return torch.bincount(index, minlength=m.num_classes ** 2)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    eval_step()
    synchronize(device)
    compile_eval = time.perf_counter() - start
    eval_times = time_calls(eval_step, device, steps=cfg.bench.steps, warmup=cfg.bench.warmup)
    start = time.perf_counter()
    train_step()
    synchronize(device)
    compile_train = time.perf_counter() - start
    train_times = time_calls(train_step, device, steps=cfg.bench.steps,
                             warmup=cfg.bench.warmup)
    train_s, eval_s = statistics.median(train_times), statistics.median(eval_times)
    return {
        "dtype": dtype, "num_params": int(num_params),
        "compile_train_s": compile_train, "compile_eval_s": compile_eval,
        "train_step_s": train_s, "train_step_s_min": min(train_times),
        "eval_step_s": eval_s,
        "train_images_per_s": batch / train_s, "eval_images_per_s": batch / eval_s,
        "peak_memory_bytes": (int(torch.cuda.max_memory_allocated(device))
                              if device.type == "cuda" else None),
    }


def main(argv):
    del argv
    config = FLAGS.config
    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    device = torch.device(FLAGS.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtypes = config_lib.comma_list(config.bench.dtypes)
    results = []
    for dtype in dtypes:
        print(f"timing the torch peer of {config.name} in {dtype} on {device} ...",
              file=sys.stderr, flush=True)
        results.append(benchmark_dtype(config, dtype, device, compile_model=FLAGS.compile,
                                       channels_last=FLAGS.channels_last))
    name = (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    report = {"setup": {"config": config.name, "framework": "torch",
                        "torch": torch.__version__, "device": name,
                        "platform": device.type, "host_cores": os.cpu_count(),
                        "threads": torch.get_num_threads(), "compile": FLAGS.compile,
                        "channels_last": FLAGS.channels_last,
                        "batch_size": config.bench.batch_size or config.batch_size,
                        "crop_size": config.bench.crop_size or config.data.crop_size},
              "results": results}
    with open(FLAGS.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    for r in results:
        print(f"{r['dtype']}: train {1e3 * r['train_step_s']:.1f} ms "
              f"({r['train_images_per_s']:.2f} img/s), eval {1e3 * r['eval_step_s']:.1f} ms "
              f"({r['eval_images_per_s']:.2f} img/s), first steps {r['compile_train_s']:.1f} / "
              f"{r['compile_eval_s']:.1f} s, {r['num_params']} parameters")


if __name__ == "__main__":
    define_flags()
    app.run(main)
