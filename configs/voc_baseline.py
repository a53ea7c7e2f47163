"""VOC 2012: single-scale DeepLab-LargeFOV, `voc_s3`'s recipe at scale 1 only
(no merge, no extra supervision: one branch, one loss).

CRF: DeepLab-LargeFOV's own values, w1 4, theta_alpha 121, theta_beta 5, w2 3,
theta_gamma 3, 10 iterations (DeepLab's released-model list of CRF settings,
"DeepLab-LargeFOV: bi_w = 4, bi_xy_std = 121, bi_rgb_std = 5, pos_w = 3,
pos_xy_std = 3"), with its 2011 densecrf's row normalisation: `voc_s3`'s values,
sourced here.
"""
from scaleattn import config


def get_config():
    c = config.recipe("voc_s3")
    c.name = "voc_baseline"
    c.model.scales = (1.0,)
    c.loss.extra_supervision = False
    return c
