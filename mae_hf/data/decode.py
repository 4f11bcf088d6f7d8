"""One image from its bytes to uint8 pixels: the geometry every data path shares (docs/data.md, "Images"), decoding
(bad images named, 16-bit and float images scaled), and pasting into the top left of a fixed canvas whose free part
repeats the image's edge, so that a bilinear crop near the edge never reads a colour the image does not have."""

import io
from dataclasses import dataclass

import numpy as np

HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit samples (PNG "I" holds 16-bit ones too)
LONG_SIDE_FACTOR = 1.5  # default long-side cap: 384 for 256 keeps ImageNet's 4:3 and 3:2 images whole
ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees


class BadImage(ValueError):
    """An image that cannot be decoded; its message says why."""

    @classmethod
    def of(cls, error: Exception) -> "BadImage":
        """The error a library raised for a bad file, as one line naming its type."""
        return cls(" ".join(f"{type(error).__name__}: {error}".split()))


@dataclass(frozen=True)
class Geometry:
    """How images are stored: aspect kept, short side <= `short_side`, long side <= `max_long_side`."""

    short_side: int
    max_long_side: int
    num_channels: int = 3

    @classmethod
    def for_short_side(cls, short_side: int, num_channels: int = 3, max_long_side: int | None = None) -> "Geometry":
        return cls(short_side, max_long_side or round(LONG_SIDE_FACTOR * short_side), num_channels)

    def __post_init__(self):  # the flags that set it when preparing (scripts/prepare_data.py)
        if self.short_side < 1:
            raise ValueError(f"--short_side must be at least 1 (pixels), got {self.short_side}.")
        if self.max_long_side < self.short_side:
            raise ValueError(f"--max_long_side ({self.max_long_side}) must be at least --short_side "
                             f"({self.short_side}).")
        if self.num_channels not in (1, 3):
            raise ValueError(f"--num_channels: images have 1 (grey) or 3 (RGB) channels, not {self.num_channels}.")

    @property
    def mode(self) -> str:
        return "RGB" if self.num_channels == 3 else "L"

    def stored_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of this size once stored."""
        scale = min(1.0, self.short_side / min(height, width), self.max_long_side / max(height, width))
        return max(1, round(height * scale)), max(1, round(width * scale))


def to_8_bit(image):
    """16-bit and float images as 8-bit greyscale, scaled (0..65535 -> 0..255, floats 0..1 -> 0..255): PIL's own
    convert("RGB"/"L") clips those samples at 255, which turns a 16-bit image white."""
    from PIL import Image

    if image.mode in HIGH_BIT_DEPTH_MODES:
        samples = np.asarray(image).astype(np.float64) / 257
    elif image.mode == "F":
        samples = np.asarray(image).astype(np.float64) * 255
    else:
        return image
    return Image.fromarray(np.clip(np.rint(samples), 0, 255).astype(np.uint8), "L")


def open_image(value):
    """The PIL image (header read, pixels not yet decoded) of an undecoded image: raw bytes, or a `datasets`
    {bytes, path} value. A missing, empty or unreadable image raises `BadImage` saying which."""
    from PIL import Image, UnidentifiedImageError

    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
    if data is None and not path:
        raise BadImage("the image is missing (None)")
    try:
        if data is None:
            with open(path, "rb") as handle:  # read at once: no file handle stays open in a worker
                data = handle.read()
        if len(data) == 0:
            raise BadImage("the image is an empty (0-byte) file")
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image in a format PIL reads (corrupt or not an image file)") from None
    except BadImage:
        raise
    except Exception as error:  # PIL and the file system raise many types for a bad file: all mean "bad"
        raise BadImage.of(error) from None


def orientation(image) -> int | None:
    try:
        return image.getexif().get(0x0112)  # EXIF Orientation
    except Exception:  # a broken EXIF block: the picture as stored
        return None


def _upright_size(image) -> tuple[int, int]:
    """(width, height) of the picture once turned upright as its EXIF orientation says (as `datasets` does)."""
    width, height = image.size
    return (height, width) if orientation(image) in ROTATED_ORIENTATIONS else (width, height)


def stored_size(value, geometry: Geometry) -> tuple[int, int]:
    """(height, width) an undecoded image will have once decoded with `decode_image`, from its header alone."""
    from PIL import Image

    path = value.get("path") if isinstance(value, dict) and value.get("bytes") is None else None
    try:
        with Image.open(path) if path else open_image(value) as image:  # a file: its header only
            width, height = _upright_size(image)
    except Exception:  # a header that cannot be read: let `open_image` name the problem
        width, height = _upright_size(open_image(value))
    if not width or not height:
        raise BadImage(f"the image has no pixels ({width}x{height})")
    return geometry.stored_size(height, width)


def decode_image(value, geometry: Geometry):
    """The PIL image of an undecoded image in `geometry`: upright (EXIF orientation applied, as `datasets` does),
    8-bit RGB or grey, scaled down; a JPEG decoded at a reduced scale when that still covers the stored size."""
    from PIL import Image, ImageOps

    image = open_image(value)
    try:
        width, height = _upright_size(image)
        target_height, target_width = geometry.stored_size(height, width)
        rotated = orientation(image) in ROTATED_ORIENTATIONS
        if image.format == "JPEG" and (target_width, target_height) != (width, height):
            # the smallest 1/2, 1/4, 1/8 scale that covers the target, in the file's own orientation
            image.draft(None, (target_height, target_width) if rotated else (target_width, target_height))
        if orientation(image) not in (None, 1):
            image = ImageOps.exif_transpose(image)
        image = to_8_bit(image).convert(geometry.mode)
        if image.size != (target_width, target_height):
            image = image.resize((target_width, target_height), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return image
    except Exception as error:  # a truncated or corrupt file fails while decoding
        raise BadImage.of(error) from None


def bands(image) -> list[np.ndarray]:
    """The `(height, width)` uint8 planes of an 8-bit PIL image, one copy each (PIL splits bands faster than numpy
    transposes, and `tobytes` copies once where `np.asarray` goes through a second buffer)."""
    width, height = image.size
    planes = image.split() if image.mode != "L" else (image,)
    return [np.frombuffer(plane.tobytes(), dtype=np.uint8).reshape(height, width) for plane in planes]


def channels_first(picture) -> np.ndarray:
    """uint8 `(channels, height, width)` of a picture: a PIL image, or such an array already."""
    return picture if isinstance(picture, np.ndarray) else np.stack(bands(picture))


def decode_stored(data, height: int, width: int, encoding: str, num_channels: int):
    """An image as a prepared folder stores it: uint8 `(channels, height, width)` from raw bytes, or the decoded PIL
    image of a JPEG, converted when the model's channel count differs from the folder's."""
    if encoding == "raw":
        pixels = np.frombuffer(data, dtype=np.uint8)
        channels = pixels.size // (height * width)
        pixels = pixels.reshape(channels, height, width)
        if channels == num_channels:
            return pixels
        if num_channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
            return np.rint(np.tensordot([0.299, 0.587, 0.114], pixels, axes=1)).astype(np.uint8)[None]
        return np.repeat(pixels, 3, axis=0)
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        if (image.mode == "L") != (num_channels == 1):
            image = image.convert("L" if num_channels == 1 else "RGB")
        return image
    except Exception as error:
        raise BadImage.of(error) from None


def paste(canvas: np.ndarray, picture) -> tuple[int, int]:
    """Copy a picture (a PIL image, or `(C, h, w)` uint8) into the top-left of a `(C, H, W)` canvas (h <= H,
    w <= W) and fill the rest with the image's last column and row; returns (h, w)."""
    if isinstance(picture, np.ndarray):
        height, width = picture.shape[1:]
        canvas[:, :height, :width] = picture
    else:
        width, height = picture.size
        for channel, plane in enumerate(bands(picture)):
            canvas[channel, :height, :width] = plane
    if width < canvas.shape[2]:
        canvas[:, :height, width:] = canvas[:, :height, width - 1:width]
    if height < canvas.shape[1]:
        canvas[:, height:, :] = canvas[:, height - 1:height, :]
    return height, width
