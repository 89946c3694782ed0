"""FFCV image decoders whose random crops and flips are a fixed function of (seed, epoch, sample).

FFCV's own random decoders draw from numba's per-thread generator, so a resumed job would
see different crops. These decoders draw every random number from a hash instead: sample
``i`` of epoch ``e`` is cropped with the key ``hash(hash(seed, e), i)``, as the torchvision
loaders seed each sample from ``(seed, epoch, index)``. A job resumed mid-epoch therefore sees
bit-identical batches, and a sample's crop does not depend on its batch, the rank that decodes
it or the number of ranks. The compiled code reads the epoch's key from an 8-byte box the
decoder owns (through libc's memcpy: numba freezes captured arrays), so setting ``epoch``
needs no recompilation.

Decoders write (B, H, W, 3) uint8 images (HWC, as FFCV does); the loader turns them into
normalised (B, 3, H, W) tensors on the training device.
"""
from __future__ import annotations

import ctypes
from dataclasses import replace
from typing import Callable, Tuple

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import imdecode, memcpy, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_A = np.uint64(0xBF58476D1CE4E5B9)
_MIX_B = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_UNIT = 1.0 / float(1 << 53)
#: Draws used by the crop attempts (4 per attempt); the flip uses the draw after them.
_CROP_ATTEMPTS = 10
_FLIP_DRAW = 4 * _CROP_ATTEMPTS

_memcpy = ctypes.CDLL("libc.so.6").memcpy
_memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcpy.restype = ctypes.c_void_p


@njit(nogil=True)
def mix64(z: np.uint64) -> np.uint64:
    """splitmix64's finaliser: a bijective 64-bit hash (uint64 in, uint64 out)."""
    z = (z ^ (z >> _S30)) * _MIX_A
    z = (z ^ (z >> _S27)) * _MIX_B
    return z ^ (z >> _S31)


@njit(nogil=True)
def unit(key: np.uint64, draw: int) -> float:
    """The ``draw``-th uniform number in [0, 1) of ``key``."""
    return float(mix64(key + np.uint64(draw + 1) * _GOLDEN) >> _S11) * _UNIT


@njit(nogil=True)
def read_key(address: int) -> np.uint64:
    """The uint64 stored at memory ``address`` (read at run time, unlike a captured array)."""
    out = np.zeros(1, dtype=np.uint64)
    _memcpy(out.ctypes.data, address, 8)
    return out[0]


@njit(nogil=True)
def random_resized_crop(height: int, width: int, scale: np.ndarray, log_ratio: np.ndarray,
                        key: np.uint64) -> Tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, h, w) drawn from ``key``.

    Up to 10 tries of an area share in ``scale`` and a log aspect ratio in ``log_ratio``; if
    none fits, the largest centred box with a ratio inside the range.
    """
    area = height * width
    for attempt in range(_CROP_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * unit(key, 4 * attempt))
        ratio = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * unit(key, 4 * attempt + 1))
        w = int(round(np.sqrt(target * ratio)))
        h = int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(unit(key, 4 * attempt + 2) * (height - h + 1))
            left = int(unit(key, 4 * attempt + 3) * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    lo, hi = np.exp(log_ratio[0]), np.exp(log_ratio[1])
    if in_ratio < lo:
        w, h = width, int(round(width / lo))
    elif in_ratio > hi:
        w, h = int(round(height * hi)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@njit(nogil=True)
def flip_columns(image: np.ndarray) -> None:
    """Mirror an (H, W, C) image left-right in place."""
    width = image.shape[1]
    for y in range(image.shape[0]):
        for x in range(width // 2):
            for c in range(image.shape[2]):
                left = image[y, x, c]
                image[y, x, c] = image[y, width - 1 - x, c]
                image[y, width - 1 - x, c] = left


@njit(nogil=True)
def pad_crop(source: np.ndarray, destination: np.ndarray, pad: int, top: int, left: int) -> None:
    """Copy the (H, W, C) window at (top, left) of ``source`` zero-padded by ``pad`` pixels."""
    height, width = source.shape[0], source.shape[1]
    destination[:] = 0
    for y in range(height):
        sy = y + top - pad
        if 0 <= sy < height:
            for x in range(width):
                sx = x + left - pad
                if 0 <= sx < width:
                    destination[y, x] = source[sy, sx]


class _SeededDecoder(Operation):
    """Shared decoding of an RGBImageField sample (JPEG or raw) into a scratch buffer."""

    def __init__(self, seed: int, flip: bool) -> None:
        super().__init__()
        self.seed = seed
        self.flip = flip
        self.key_box = np.zeros(1, dtype=np.uint64)  # read by the compiled code at each batch
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the following batches' crops for ``epoch``: key ``hash(hash(seed) ^ epoch)``."""
        seed = np.uint64(mix64(np.uint64(self.seed % (1 << 64))))
        self.key_box[0] = np.uint64(mix64(np.uint64(seed ^ np.uint64(epoch))))

    def scratch_query(self) -> AllocationQuery:
        widths, heights = self.metadata["width"], self.metadata["height"]
        largest = np.uint64(widths.max()) * np.uint64(heights.max()) * np.uint64(3)
        return AllocationQuery((largest,), np.dtype("<u1"))

    def decoder(self) -> Callable:
        """``decode_into(field, storage_state, scratch) -> (H, W, 3) view of the image``."""
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        imdecode_c = Compiler.compile(imdecode)
        memcpy_c = Compiler.compile(memcpy)

        def decode_into(field, storage_state, scratch):
            data = mem_read(field["data_ptr"], storage_state)
            height, width = np.uint32(field["height"]), np.uint32(field["width"])
            size = 3 * height * width
            if field["mode"] == jpg:
                imdecode_c(data, scratch, height, width, height, width, 0, 0, 1, 1, False, False)
            else:
                memcpy_c(data, scratch[:size])
            return scratch[:size].reshape(height, width, 3)

        return Compiler.compile(decode_into)

    def seeded_loop(self, place: Callable) -> Callable:
        """FFCV's decode function: each sample is decoded, then ``place(image, destination,
        key)`` writes its crop (a compiled function), then it is flipped if its key says so."""
        decode_into = self.decoder()
        rows = Compiler.get_iterator()
        box, flip = self.key_box.ctypes.data, self.flip

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            base = read_key(box)
            for row in rows(len(batch_indices)):
                sample = batch_indices[row]
                image = decode_into(metadata[sample], storage_state, scratch[row])
                key = mix64(base ^ np.uint64(sample))
                place(image, destination[row], key)
                if flip and unit(key, _FLIP_DRAW) < 0.5:
                    flip_columns(destination[row])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededResizedCropDecoder(_SeededDecoder):
    """Random-resized-crop to ``size`` x ``size`` then an optional flip (ImageNet training).

    scale, ratio: ranges of the crop's area share and aspect ratio (torchvision's defaults).
    """

    def __init__(self, size: int, seed: int, flip: bool = True,
                 scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        super().__init__(seed, flip)
        self.size = size
        self.scale = np.array(scale, dtype=np.float64)
        self.log_ratio = np.log(np.array(ratio, dtype=np.float64))

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Tuple]:
        shape = (self.size, self.size, 3)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                (AllocationQuery(shape, np.dtype("<u1")), self.scratch_query()))

    def generate_code(self) -> Callable:
        resize_crop_c = Compiler.compile(resize_crop)
        scale, log_ratio = self.scale, self.log_ratio

        def place(image, destination, key):
            top, left, h, w = random_resized_crop(image.shape[0], image.shape[1], scale,
                                                  log_ratio, key)
            resize_crop_c(image, top, top + h, left, left + w, destination)

        return self.seeded_loop(Compiler.compile(place))


class SeededPadCropDecoder(_SeededDecoder):
    """Random crop of the ``pad``-pixel zero-padded image, same size, then an optional flip
    (the CIFAR recipe). Every image of the split must have the same size."""

    def __init__(self, pad: int, seed: int, flip: bool = True) -> None:
        super().__init__(seed, flip)
        self.pad = pad

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Tuple]:
        heights, widths = self.metadata["height"], self.metadata["width"]
        if heights.min() != heights.max() or widths.min() != widths.max():
            raise TypeError("SeededPadCropDecoder needs images of one size; this .beton mixes "
                            f"{heights.min()}-{heights.max()} x {widths.min()}-{widths.max()}")
        shape = (int(heights.max()), int(widths.max()), 3)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                (AllocationQuery(shape, np.dtype("<u1")), self.scratch_query()))

    def generate_code(self) -> Callable:
        pad = self.pad

        def place(image, destination, key):
            top = int(unit(key, 0) * (2 * pad + 1))
            left = int(unit(key, 1) * (2 * pad + 1))
            pad_crop(image, destination, pad, top, left)

        return self.seeded_loop(Compiler.compile(place))
