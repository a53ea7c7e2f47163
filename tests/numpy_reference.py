"""Independent numpy references shared by several test modules."""

import numpy as np


def np_conv(x, kernel, stride=1, dilation=1, groups=1):
    """Symmetric-padded convolution, NHWC/HWIO, as the concat of per-group convolutions."""
    kh, kw, cin_g, cout = kernel.shape
    pad_h, pad_w = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
    xp = np.pad(x, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)))
    out_h = (x.shape[1] + 2 * pad_h - dilation * (kh - 1) - 1) // stride + 1
    out_w = (x.shape[2] + 2 * pad_w - dilation * (kw - 1) - 1) // stride + 1
    cout_g = cout // groups
    outputs = []
    for g in range(groups):
        xg = xp[..., g * cin_g:(g + 1) * cin_g]
        kg = kernel[..., g * cout_g:(g + 1) * cout_g]
        out = np.zeros((x.shape[0], out_h, out_w, cout_g))
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, i * dilation:i * dilation + stride * (out_h - 1) + 1:stride,
                           j * dilation:j * dilation + stride * (out_w - 1) + 1:stride]
                out += patch @ kg[i, j]
        outputs.append(out)
    return np.concatenate(outputs, axis=-1)
