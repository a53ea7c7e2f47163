"""A tiny demo training run's config, shared by the end-to-end tests."""

from scaleattn import config as config_lib


def tiny_demo_config(data_dir, *, images: tuple[int, int], crop: int, fc_width: int,
                     batch: int, steps: int, log_every: int, checkpoint_every: int):
    """The demo config shrunk to ``images`` (train, val) demo images of a ``crop``² crop,
    width 1/16, ``batch`` for training and evaluation, one device (jit), no evaluation
    during training."""
    c = config_lib.recipe("demo")
    c.data.data_dir = str(data_dir)
    c.data.demo_train_size, c.data.demo_val_size = images
    c.data.crop_size = crop
    c.model.width, c.model.fc_width = 1 / 16, fc_width
    c.batch_size, c.eval.batch_size = batch, batch
    c.train.steps, c.train.log_every, c.train.checkpoint_every = steps, log_every, checkpoint_every
    c.train.eval_every = 0
    c.parallel.mode = "jit"  # pmap and sharded runs are compared in test_parallel.py
    return c
