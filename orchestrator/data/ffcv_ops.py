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
from typing import Callable, Optional, Sequence, Tuple

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
def copy_mirrored(source: np.ndarray, destination: np.ndarray, mirrored: bool) -> None:
    """Copy an (H, W, C) image, mirrored left-right when ``mirrored``."""
    width = source.shape[1]
    if not mirrored:
        destination[:] = source
        return
    for y in range(source.shape[0]):
        for x in range(width):
            destination[y, x] = source[y, width - 1 - x]


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


@njit(nogil=True)
def to_normalised_chw(image: np.ndarray, destination: np.ndarray, scale: np.ndarray,
                      shift: np.ndarray, flip: bool) -> None:
    """(H, W, 3) uint8 -> (3, H, W) float32 ``image * scale[c] + shift[c]``, mirrored if flip."""
    height, width = image.shape[0], image.shape[1]
    for c in range(3):
        for y in range(height):
            for x in range(width):
                source = width - 1 - x if flip else x
                destination[c, y, x] = image[y, source, c] * scale[c] + shift[c]


@njit(nogil=True)
def center_crop_box(height: int, width: int, ratio: float) -> Tuple[int, int, int, int]:
    """The centred square (top, left, side, side) of side ``ratio`` x the shorter side."""
    side = int(ratio * min(height, width))
    return (height - side) // 2, (width - side) // 2, side, side


class CropDecoder(Operation):
    """Decodes an RGBImageField sample (JPEG or raw), places a crop of it in the batch and,
    for training, flips it as its key says.

    Output per sample: (H, W, 3) uint8, or with ``normalise=(mean, std)`` (per-channel
    statistics of [0, 1] pixels) (3, H, W) float32 normalised in the same pass, which saves a
    CPU-only run a pass over the batch. Subclasses give the output size and the placement.
    """

    def __init__(self, seed: int = 0, flip: bool = False,
                 normalise: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> None:
        super().__init__()
        self.seed = seed
        self.flip = flip
        self.normalise = normalise
        self.key_box = np.zeros(1, dtype=np.uint64)  # read by the compiled code at each batch
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the following batches' crops for ``epoch``: key ``hash(hash(seed) ^ epoch)``."""
        seed = np.uint64(mix64(np.uint64(self.seed % (1 << 64))))
        self.key_box[0] = np.uint64(mix64(np.uint64(seed ^ np.uint64(epoch))))

    def output_size(self) -> Tuple[int, int]:
        """(H, W) of every output image."""
        raise NotImplementedError

    def placer(self) -> Callable:
        """A compiled ``place(image, destination, key)`` writing the (H, W, 3) uint8 crop."""
        raise NotImplementedError

    def source_size(self) -> Tuple[int, int]:
        """(H, W) shared by every image of the .beton (TypeError if they differ)."""
        heights, widths = self.metadata["height"], self.metadata["width"]
        if heights.min() != heights.max() or widths.min() != widths.max():
            raise TypeError(f"{type(self).__name__} needs images of one size; this .beton mixes "
                            f"{heights.min()}-{heights.max()} x {widths.min()}-{widths.max()}")
        return int(heights.max()), int(widths.max())

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Tuple]:
        height, width = self.output_size()
        widths, heights = self.metadata["width"], self.metadata["height"]
        largest = np.uint64(widths.max()) * np.uint64(heights.max()) * np.uint64(3)
        decoded = AllocationQuery((largest,), np.dtype("<u1"))
        placed = AllocationQuery((height, width, 3), np.dtype("<u1"))
        shape, dtype = (((height, width, 3), np.dtype("<u1")) if self.normalise is None
                        else ((3, height, width), np.dtype("<f4")))
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
                (AllocationQuery(shape, dtype), decoded, placed))

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

    def finisher(self) -> Callable:
        """A compiled ``finish(placed, destination, mirrored)``: the placed (H, W, 3) uint8 crop
        into the batch, mirrored when asked (and normalised to (3, H, W) float32 if set)."""
        if self.normalise is None:
            return copy_mirrored
        mean, std = (np.asarray(v, dtype=np.float32) for v in self.normalise)
        scale, shift = (1 / (255 * std)).astype(np.float32), (-mean / std).astype(np.float32)

        def finish(placed, destination, mirrored):
            to_normalised_chw(placed, destination, scale, shift, mirrored)

        return Compiler.compile(finish)

    def generate_code(self) -> Callable:
        decode_into, place, finish = self.decoder(), self.placer(), self.finisher()
        rows = Compiler.get_iterator()
        box, flip = self.key_box.ctypes.data, self.flip

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, decoded, placed = my_storage
            base = read_key(box)
            for row in rows(len(batch_indices)):
                sample = batch_indices[row]
                image = decode_into(metadata[sample], storage_state, decoded[row])
                key = mix64(base ^ np.uint64(sample))
                place(image, placed[row], key)
                finish(placed[row], destination[row], flip and unit(key, _FLIP_DRAW) < 0.5)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededResizedCropDecoder(CropDecoder):
    """Random-resized-crop to ``size`` x ``size`` then an optional flip (ImageNet training).

    scale, ratio: ranges of the crop's area share and aspect ratio (torchvision's defaults).
    """

    def __init__(self, size: int, seed: int, flip: bool = True,
                 scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                 normalise: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> None:
        super().__init__(seed, flip, normalise)
        self.size = size
        self.scale = np.array(scale, dtype=np.float64)
        self.log_ratio = np.log(np.array(ratio, dtype=np.float64))

    def output_size(self) -> Tuple[int, int]:
        return self.size, self.size

    def placer(self) -> Callable:
        resize_crop_c = Compiler.compile(resize_crop)
        scale, log_ratio = self.scale, self.log_ratio

        def place(image, destination, key):
            top, left, h, w = random_resized_crop(image.shape[0], image.shape[1], scale,
                                                  log_ratio, key)
            resize_crop_c(image, top, top + h, left, left + w, destination)

        return Compiler.compile(place)


class CenterCropDecoder(CropDecoder):
    """The centred square of ``ratio`` x the shorter side, resized to ``size`` (evaluation)."""

    def __init__(self, size: int, ratio: float,
                 normalise: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> None:
        super().__init__(normalise=normalise)
        self.size = size
        self.ratio = ratio

    def output_size(self) -> Tuple[int, int]:
        return self.size, self.size

    def placer(self) -> Callable:
        resize_crop_c = Compiler.compile(resize_crop)
        ratio = self.ratio

        def place(image, destination, key):
            top, left, h, w = center_crop_box(image.shape[0], image.shape[1], ratio)
            resize_crop_c(image, top, top + h, left, left + w, destination)

        return Compiler.compile(place)


class SeededPadCropDecoder(CropDecoder):
    """Random crop of the ``pad``-pixel zero-padded image, same size, then an optional flip
    (the CIFAR recipe). Every image of the split must have the same size."""

    def __init__(self, pad: int, seed: int, flip: bool = True,
                 normalise: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> None:
        super().__init__(seed, flip, normalise)
        self.pad = pad

    def output_size(self) -> Tuple[int, int]:
        return self.source_size()

    def placer(self) -> Callable:
        pad = self.pad

        def place(image, destination, key):
            top = int(unit(key, 0) * (2 * pad + 1))
            left = int(unit(key, 1) * (2 * pad + 1))
            pad_crop(image, destination, pad, top, left)

        return Compiler.compile(place)


class WholeImageDecoder(CropDecoder):
    """The image as stored (evaluation on same-size images, e.g. CIFAR)."""

    def output_size(self) -> Tuple[int, int]:
        return self.source_size()

    def placer(self) -> Callable:
        def place(image, destination, key):
            destination[:] = image

        return Compiler.compile(place)
