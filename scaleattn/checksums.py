"""Checksums of the arrays of a checkpoint, the same from any copy of them.

`tree_checksums` gives every array two 32-bit position-weighted sums of its bytes
(C order): a numpy copy, a device array and a global array sharded over the devices
of several processes give the same value (the last is computed on the devices). A
change of any word of an array changes the first sum; the second, with other factors,
makes a coincidence of several changes a 2**-64 event. `checkpoint` writes them with
every step and checks them on restore.
"""

import jax
import jax.numpy as jnp
import numpy as np

CHECKSUM_FORMAT = "sum32x2-v1"

_MIX = (0x9E3779B1, 0x7F4A7C15, 0x85EBCA6B, 0xC2B2AE35)
_CHUNK = 1 << 22  # elements per numpy pass (bounded temporary memory)
_WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}


def _position_hash(index, xp):
    """A mixed odd-ish 32-bit value per element position (``index`` uint32)."""
    h = index * xp.uint32(_MIX[0]) + xp.uint32(_MIX[1])
    h = h ^ (h >> 16)
    h = h * xp.uint32(_MIX[2])
    return h ^ (h >> 13)


def _sums(words, index, xp):
    """``(sum w*(h|1), sum (w^h)*c)`` mod 2**32 of uint32 ``words`` at positions ``index``.

    Any change of one word changes the first sum (an odd factor); the second, with
    other factors, makes a coincidence of several changes a 2**-64 event.
    """
    h = _position_hash(index, xp)
    return (xp.sum(words * (h | xp.uint32(1)), dtype=xp.uint64 if xp is np else xp.uint32),
            xp.sum((words ^ h) * xp.uint32(_MIX[3]),
                   dtype=xp.uint64 if xp is np else xp.uint32))


def _numpy_checksum(array: np.ndarray) -> tuple[int, int]:
    """`_sums` of an array's bytes read as words of its item size (8 bytes: 2 words)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    words = flat.view(_WORD[flat.dtype.itemsize])
    first = second = 0
    for start in range(0, words.size, _CHUNK):
        chunk = words[start:start + _CHUNK].astype(np.uint32)
        a, b = _sums(chunk, np.arange(start, start + chunk.size, dtype=np.uint32), np)
        first, second = first + int(a), second + int(b)
    return first & 0xFFFFFFFF, second & 0xFFFFFFFF


def _device_words(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    word = _WORD[jnp.dtype(x.dtype).itemsize]
    if x.dtype != word:
        x = jax.lax.bitcast_convert_type(x, word)
    return x.reshape(-1).astype(jnp.uint32)


@jax.jit
def _device_checksums(arrays: list) -> list:
    """`_numpy_checksum` of global arrays, on their devices (``[2] uint32`` each)."""
    out = []
    for x in arrays:
        words = _device_words(x)
        out.append(jnp.stack(_sums(words, jnp.arange(words.size, dtype=jnp.uint32), jnp)))
    return out


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flat_leaves(tree) -> dict[str, object]:
    """``{'state/params/...': leaf}`` of a pytree (empty nodes and ``None`` skipped)."""
    return {"/".join(_key_name(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_checksums(tree, dtypes: dict[str, str] | None = None) -> dict[str, str]:
    """``{'state/params/net/...': 'float32[3, 3, 8, 4]:<16 hex digits>'}`` of every array.

    The digits depend only on the array's values (its bytes in C order): a numpy
    array, a device array and a global array sharded over the devices of several
    processes give the same string. The last case is computed on the devices (every
    process must call this with the same tree), all others on the host. ``dtypes``
    (``{name: 'int64'}``) are the types the values are checked in: Orbax casts a value
    to the restore template's type (a step saved from a Python int comes back as int32
    or a Python int), and the cast back is exact.
    """
    leaves = flat_leaves(tree)
    sums, distributed = {}, []
    for name, leaf in leaves.items():
        dtype = (dtypes or {}).get(name)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaves[name] = leaf.astype(dtype) if dtype and leaf.dtype != dtype else leaf
            distributed.append(name)
        else:
            leaves[name] = leaf = np.asarray(leaf)
            if dtype and leaf.dtype != dtype:
                leaves[name] = leaf = leaf.astype(dtype)
            sums[name] = _numpy_checksum(leaf)
    if distributed:
        results = _device_checksums([leaves[n] for n in distributed])
        for name, value in zip(distributed, results):
            a, b = np.asarray(value)
            sums[name] = (int(a), int(b))
    return {name: f"{np.dtype(leaves[name].dtype).name}{list(leaves[name].shape)}:"
                  f"{sums[name][0]:08x}{sums[name][1]:08x}" for name in leaves}
