"""The pure train step learns (its parallel forms are compared in test_parallel.py)."""
import flax
import jax
import numpy as np

from scaleattn import config as config_lib
from scaleattn import experiment, loop, losses, optim, parallel


def tiny_config(mode):
    c = config_lib.recipe("demo")
    c.model.width, c.model.fc_width = 1 / 16, 64
    c.model.dropout = c.model.attention_dropout = 0.0
    c.data.crop_size = 33
    c.parallel.mode = mode
    c.optim.base_lr = 0.01
    return c


def fixed_batch(n=8, size=33):
    rng = np.random.RandomState(0)
    label = np.zeros((n, size, size), np.int32)
    image = rng.randn(n, size, size, 3).astype(np.float32) * 0.1
    for i in range(n):  # one bright square per image, class i % 3 + 1
        y, x = rng.randint(0, size - 12, 2)
        label[i, y:y + 12, x:x + 12] = i % 3 + 1
        image[i, y:y + 12, x:x + 12, i % 3] += 2.0
    label[:3, :6] = 255  # uneven ignored pixels across the pmap shards
    return {"image": image, "label": label}


def run_steps(config, batch, steps):
    run = experiment.setup_run(config)
    rng = jax.random.PRNGKey(0)
    state = run.layout.put_state(experiment.initial_state(run, rng))
    device_rng = run.layout.put_replicated(rng)
    losses = []
    for _ in range(steps):
        state, metrics = run.train_step(state, run.layout.put_batch(batch), device_rng)
        losses.append(float(np.asarray(metrics["loss"]).reshape(-1)[0]))
    return jax.device_get(run.layout.host(state)), losses


def test_train_step_lowers_the_loss():
    _, losses = run_steps(tiny_config("jit"), fixed_batch(), 25)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_frozen_batch_norm_gets_no_gradient_and_grad_norm_is_of_what_trains():
    """bn_mode='frozen': the step's grad_norm is the norm of the gradient of every
    parameter but the batch-norm ones (computed here with jax.grad and numpy), the
    batch-norm parameters stay as they were, the others move."""
    config = tiny_config("jit")
    config.model.backbone, config.model.head, config.model.depth = "resnet50", "aspp_v2", (1,) * 4
    config.model.bn_mode = "frozen"
    run = experiment.setup_run(config)
    state = jax.device_get(experiment.initial_state(run, jax.random.PRNGKey(0)))
    batch = fixed_batch()

    def loss_of(params):
        outputs, _ = run.model.apply({"params": params, "batch_stats": state.batch_stats},
                                     batch["image"], train=True, mutable=["batch_stats"])
        return losses.segmentation_loss(outputs, batch["label"], config.loss)[0]

    grads = flax.traverse_util.flatten_dict(jax.jit(jax.grad(loss_of))(state.params), sep="/")
    is_bn = {k: optim.is_batch_norm(k) for k in grads}
    assert sum(is_bn.values()) >= 8 and not all(is_bn.values())
    square = {k: float(np.sum(np.asarray(g, np.float64) ** 2)) for k, g in grads.items()}
    assert sum(v for k, v in square.items() if is_bn[k]) > 0  # they would get a gradient
    expected = np.sqrt(sum(v for k, v in square.items() if not is_bn[k]))

    new_state, metrics = run.train_step(state, batch, jax.random.PRNGKey(1))
    np.testing.assert_allclose(float(metrics["grad_norm"]), expected, rtol=1e-4)
    before = flax.traverse_util.flatten_dict(state.params, sep="/")
    after = flax.traverse_util.flatten_dict(jax.device_get(new_state.params), sep="/")
    for key, value in before.items():
        if is_bn[key]:
            np.testing.assert_array_equal(after[key], value, err_msg=key)
        else:
            assert not np.array_equal(after[key], value) or not square[key], key


# pmap over 8 devices vs one device (and the sharded meshes): tests/test_parallel.py


def test_prefetch_keeps_order_and_runs_size_batches_ahead():
    pulled, put = [], []

    def source():
        for i in range(5):
            pulled.append(i)
            yield {"x": np.full((2,), i)}

    def put_batch(batch):
        put.append(int(batch["x"][0]))
        return {"x": batch["x"] * 10}

    batches = loop.prefetch(source(), put_batch, size=2)
    first = next(batches)
    assert int(first["x"][0]) == 0
    assert pulled == [0, 1, 2] and put == [0, 1, 2]  # two batches already on their way
    rest = [int(b["x"][0]) for b in batches]
    assert rest == [10, 20, 30, 40]
    assert [int(b["x"][0]) for b in loop.prefetch(source(), put_batch, size=0)] == [
        0, 10, 20, 30, 40]


def test_put_batch_places_pmap_slices_on_devices():
    layout = parallel.Layout("pmap")
    n = jax.local_device_count()
    batch = {"image": np.arange(2 * n * 3, dtype=np.float32).reshape(2 * n, 3)}
    placed = layout.put_batch(batch)["image"]
    assert isinstance(placed, jax.Array) and placed.shape == (n, 2, 3)
    assert {s.device for s in placed.addressable_shards} == set(jax.local_devices())
    np.testing.assert_array_equal(np.asarray(placed).reshape(2 * n, 3), batch["image"])
