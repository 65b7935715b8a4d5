"""Seeded latin text and its rendering with the DejaVu fonts, for the OCR models' data.

The text is a mix of what OCR meets on receipts, forms and signs: words, numbers, dates, times,
prices, codes, e-mail-like strings and punctuation, 3 to 25 characters long. Each line is drawn
in one of several DejaVu faces (Sans, Serif, Mono, Bold, Condensed, Oblique) with slight
variations of size, grey level, background and position. Everything comes from a numpy
``Generator`` handed in by the caller, so a (seed, split, index) triple always gives the same
text and the same pixels.

The held-out "hard" lines (:func:`hard_text`, :func:`hard_style`, :func:`render_hard_line`) differ
from those on purpose: 16 to 28 characters (squeezed harder into the recognizer's 320 columns),
more brackets, quotes and symbols, fonts the other splits never use (Liberation, and the DejaVu
faces left out of ``FACES``), slight rotation, blur and noise on most lines, low contrast. They
stay printable ASCII: PP-OCRv4 rec reads accented Latin letters as their base letter and some
symbols (bullet, yen, section) as look-alikes, so such labels would measure the labels, not
the model; and no CJK font is installed here to draw Chinese.
"""

from __future__ import annotations

import functools
import logging
import string
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from onnxcomp.errors import UserError

logger = logging.getLogger(__name__)

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"),
             Path("/usr/share/fonts/TTF"))

# Faces used, by file name; whichever of them are found are used.
FACES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSansCondensed.ttf", "DejaVuSansCondensed-Bold.ttf", "DejaVuSerifCondensed.ttf",
)

_WORD_TEXT = (
    "the of and to in is for on with as by at from that this are be or an it was new data "
    "total price order invoice date time name street road city north south east west market "
    "station office bank hotel coffee water paper model number account phone email store open "
    "closed monday friday sunday january march june october december receipt amount change cash "
    "card credit balance payment tax item quantity unit weight height width length speed level "
    "green blue red black white yellow orange silver gold light dark small large medium high low "
    "first second third last next page chapter section table figure report summary notice "
    "warning caution danger exit entrance parking floor room door window street avenue lane "
    "park garden river bridge tower center museum library school college university hospital "
    "pharmacy bakery kitchen menu breakfast lunch dinner tea milk bread cheese apple orange "
    "lemon sugar salt pepper rice pasta pizza burger salad soup fish chicken beef coffee juice "
    "welcome thank you please call visit online service support customer delivery shipping "
    "return refund discount sale offer free special limited edition version release update "
    "system network server client memory storage battery power energy voltage current signal "
    "engine motor sensor camera screen keyboard mouse printer scanner cable adapter charger "
    "Berlin Paris London Madrid Rome Vienna Prague Dublin Oslo Lisbon Zurich Boston Denver "
    "Anna Peter Maria John Laura David Sophie Martin Clara Thomas Emma Lucas"
)
WORDS = tuple(_WORD_TEXT.split())

# Faces only the hard split uses (whichever are found; matplotlib ships none of them).
HARD_FONT_DIRS = (Path("/usr/share/fonts/truetype/liberation"),
                  Path("/usr/share/fonts/truetype/liberation2"), *FONT_DIRS)
HARD_FACES = (
    "LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf", "LiberationSans-Italic.ttf",
    "LiberationSans-BoldItalic.ttf", "LiberationSerif-Regular.ttf", "LiberationSerif-Bold.ttf",
    "LiberationSerif-Italic.ttf", "LiberationSerif-BoldItalic.ttf", "LiberationMono-Regular.ttf",
    "LiberationMono-Bold.ttf", "LiberationSansNarrow-Regular.ttf", "LiberationSansNarrow-Bold.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSans-ExtraLight.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansCondensed-Oblique.ttf", "DejaVuSerifCondensed-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
)

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _number(rng: np.random.Generator) -> str:
    kind = rng.integers(5)
    if kind == 0:
        return str(int(rng.integers(0, 100)))
    if kind == 1:
        return str(int(rng.integers(100, 100_000)))
    if kind == 2:
        return f"{rng.integers(0, 1000)}.{rng.integers(0, 100):02d}"
    if kind == 3:
        return f"{int(rng.integers(1, 1000)):,}"
    return f"{rng.integers(0, 100)}%"


def _one_of(rng: np.random.Generator, choices: tuple[str, ...]) -> str:
    """One of ``choices``, uniformly (one draw from ``rng``)."""
    return choices[int(rng.integers(len(choices)))]


def _date(rng: np.random.Generator) -> str:
    year, month, day = int(rng.integers(1990, 2031)), int(rng.integers(1, 13)), int(
        rng.integers(1, 29))
    return _one_of(rng, (f"{year}-{month:02d}-{day:02d}", f"{day:02d}/{month:02d}/{year}",
                         f"{day} {MONTHS[month - 1]} {year}",
                         f"{day:02d}.{month:02d}.{year % 100:02d}"))


def _time(rng: np.random.Generator) -> str:
    text = f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}"
    return text + (f":{rng.integers(0, 60):02d}" if rng.random() < 0.3 else "")


def _price(rng: np.random.Generator) -> str:
    value = f"{rng.integers(0, 2000)}.{rng.integers(0, 100):02d}"
    return _one_of(rng, (f"${value}", f"{value} USD", f"EUR {value}", f"-{value}"))


def _code(rng: np.random.Generator) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    head = "".join(letters[i] for i in rng.integers(0, len(letters), size=rng.integers(1, 4)))
    tail = str(int(rng.integers(10, 100_000)))
    return f"{head}{rng.choice(['-', '', '/', '#'])}{tail}"


def _word(rng: np.random.Generator) -> str:
    word = _one_of(rng, WORDS)
    case = rng.random()
    if case < 0.2:
        return word.capitalize()
    if case < 0.3:
        return word.upper()
    return word


def _email(rng: np.random.Generator) -> str:
    return f"{_word(rng).lower()}{rng.integers(0, 100)}@{_word(rng).lower()}.com"


_PIECES: tuple[tuple[Callable[[np.random.Generator], str], float], ...] = (
    (_word, 0.55), (_number, 0.12), (_date, 0.07), (_time, 0.05), (_price, 0.09),
    (_code, 0.08), (_email, 0.04),
)


def random_text(rng: np.random.Generator, min_len: int = 3, max_len: int = 25,
                allowed: Callable[[str], bool] | None = None) -> str:
    """One line of 3-25 characters: pieces joined by spaces, with occasional punctuation."""
    makers, weights = zip(*_PIECES)
    probs = np.asarray(weights) / sum(weights)
    target = int(rng.integers(min_len, max_len + 1))
    for _ in range(100):
        parts: list[str] = []
        while len(" ".join(parts)) < target:
            piece = makers[int(rng.choice(len(makers), p=probs))](rng)
            if rng.random() < 0.12:
                piece += str(rng.choice([",", ".", ":", ";", "!", "?"]))
            elif rng.random() < 0.04:
                piece = f"({piece})"
            parts.append(piece)
        text = " ".join(parts)
        if len(text) > max_len:
            # Drop the last piece if it overshoots (keep at least one).
            shorter = " ".join(parts[:-1])
            text = shorter if len(shorter) >= min_len else text[:max_len].rstrip()
        if min_len <= len(text) <= max_len and (allowed is None or allowed(text)):
            return text
    raise UserError("could not generate a text line from the allowed characters")


def text_split(text: str) -> int:
    """0 or 1: which split a text belongs to, so calibration and evaluation texts never meet."""
    return zlib.crc32(text.encode("utf-8")) & 1


def texts_for_split(rng: np.random.Generator, split_bit: int, count: int,
                    allowed: Callable[[str], bool] | None = None,
                    line: Callable[..., str] | None = None) -> list[str]:
    """``count`` lines of one half of the text split, drawn by ``line`` (``random_text`` by
    default; ``hard_text`` and ``train_text`` draw the other splits' lines)."""
    line = line or random_text
    texts = []
    while len(texts) < count:
        text = line(rng, allowed=allowed)
        if text_split(text) == split_bit:
            texts.append(text)
    return texts


def _hard_piece(rng: np.random.Generator) -> str:
    """A piece of a hard line: a regular piece, at times wrapped in brackets or quotes or
    followed by ASCII punctuation the easy splits rarely draw."""
    makers, weights = zip(*_PIECES)
    piece = makers[int(rng.choice(len(makers), p=np.asarray(weights) / sum(weights)))](rng)
    if rng.random() < 0.12:
        left, right = _one_of(rng, ("[]", "{}", "<>", '""', "''", "**", "__"))
        piece = f"{left}{piece}{right}"
    if rng.random() < 0.12:
        piece += _one_of(rng, (",", ";", "!", "?", "&", "+", "=", "~", "^", "/"))
    return piece


def hard_text(rng: np.random.Generator, min_len: int = 16, max_len: int = 28,
              allowed: Callable[[str], bool] | None = None) -> str:
    """One hard line of ``min_len``-``max_len`` characters (22-34: PP-OCRv4 rec reads 40 CTC
    steps, so longer lines could not be read back at all)."""
    for _ in range(100):
        target = int(rng.integers(min_len, max_len + 1))
        parts: list[str] = []
        while len(" ".join(parts)) < target:
            parts.append(_hard_piece(rng))
        text = " ".join(parts)
        if len(text) > max_len:
            text = " ".join(parts[:-1]) if len(" ".join(parts[:-1])) >= min_len else \
                text[:max_len].rstrip()
        if min_len <= len(text) <= max_len and (allowed is None or allowed(text)):
            return text
    raise UserError("could not generate a hard text line from the allowed characters")


# ---------------------------------------------------------------------------------------------
# fonts


def _matplotlib_font_dir() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("matplotlib")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf"
    return folder if folder.is_dir() else None


@functools.lru_cache(maxsize=1)
def font_files() -> tuple[Path, ...]:
    """The DejaVu font files found on this machine (system fonts, else matplotlib's copies)."""
    folders = [d for d in FONT_DIRS if d.is_dir()]
    mpl = _matplotlib_font_dir()
    if mpl is not None:
        folders.append(mpl)
    for folder in folders:
        found = tuple(folder / face for face in FACES if (folder / face).is_file())
        if found:
            return found
    raise UserError(
        "no DejaVu fonts found (looked in "
        + ", ".join(str(d) for d in FONT_DIRS)
        + " and matplotlib's mpl-data/fonts/ttf); install them, e.g. apt-get install fonts-dejavu-core"
    )


@functools.lru_cache(maxsize=1)
def hard_font_files() -> tuple[Path, ...]:
    """The faces of the hard split found on this machine (none of ``FACES``)."""
    found: dict[str, Path] = {}
    for folder in HARD_FONT_DIRS:
        for face in HARD_FACES:
            if face not in found and (folder / face).is_file():
                found[face] = folder / face
    if not found:
        raise UserError("no fonts for the hard split found (looked for Liberation and DejaVu "
                        "faces in " + ", ".join(str(d) for d in HARD_FONT_DIRS) + "); install "
                        "them, e.g. apt-get install fonts-liberation fonts-dejavu-extra")
    if len(found) < len(HARD_FACES):  # another draw of lines than on a machine with all
        logger.warning("the hard split found %d of its %d faces (%s missing): its lines differ "
                       "from a machine's with all of them", len(found), len(HARD_FACES),
                       ", ".join(f for f in HARD_FACES if f not in found))
    return tuple(found[face] for face in HARD_FACES if face in found)


# Faces only the train split adds (from matplotlib's fonts, where it is installed): another
# family (a Times-like serif) beside DejaVu, none of the hard split's faces.
TRAIN_EXTRA_FACES = ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
                     "STIXGeneralBolIta.ttf")


@functools.lru_cache(maxsize=1)
def train_font_files() -> tuple[Path, ...]:
    """``font_files`` plus the ``TRAIN_EXTRA_FACES`` found (said when some are missing)."""
    mpl = _matplotlib_font_dir()
    extra = tuple(mpl / face for face in TRAIN_EXTRA_FACES if mpl and (mpl / face).is_file())
    if len(extra) < len(TRAIN_EXTRA_FACES):
        logger.warning("the train split found %d of its %d extra faces (matplotlib's STIX fonts): "
                       "its lines differ from a machine's with all of them", len(extra),
                       len(TRAIN_EXTRA_FACES))
    return font_files() + extra


@functools.lru_cache(maxsize=256)
def font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


# ---------------------------------------------------------------------------------------------
# rendering


@dataclass(frozen=True)
class LineStyle:
    """How one line is drawn (all chosen from the seeded generator)."""

    font_path: Path
    size: int
    ink: tuple[int, int, int]
    paper: tuple[int, int, int]
    margin_x: tuple[int, int]
    margin_top: float  # fraction of the font size above the ascender line
    margin_bottom: float
    noise: float  # std of additive pixel noise
    blur: float  # Gaussian blur radius in pixels (0: sharp)


def _grey(rng: np.random.Generator, low: int, high: int) -> tuple[int, int, int]:
    level = int(rng.integers(low, high + 1))
    tint = rng.integers(-6, 7, size=3)
    return tuple(int(np.clip(level + t, 0, 255)) for t in tint)


def random_style(rng: np.random.Generator, size_range: tuple[int, int] = (12, 44)) -> LineStyle:
    fonts = font_files()
    ink, paper = _grey(rng, 0, 100), _grey(rng, 160, 255)
    if rng.random() < 0.1:  # some light text on a dark background
        ink, paper = _grey(rng, 200, 255), _grey(rng, 20, 80)
    size = int(rng.integers(size_range[0], size_range[1] + 1))
    return LineStyle(
        font_path=fonts[int(rng.integers(len(fonts)))],
        size=size,
        ink=ink,
        paper=paper,
        margin_x=(round(rng.uniform(0.02, 0.2) * size),
                  round(rng.uniform(0.02, 0.2) * size)),
        margin_top=float(rng.uniform(0.02, 0.2)),
        margin_bottom=float(rng.uniform(0.02, 0.2)),
        noise=float(rng.uniform(0.0, 8.0)),
        blur=float(rng.uniform(0.3, 1.0)) if rng.random() < 0.3 else 0.0,
    )


def _blur_and_noise(image: Image.Image, blur: float, noise: float,
                    rng: np.random.Generator) -> np.ndarray:
    """The last steps of every drawn line: Gaussian blur (radius ``blur``, 0: none), then
    additive pixel noise of std ``noise`` from ``rng``, as uint8."""
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32)
    if noise > 0:
        pixels = pixels + rng.normal(0.0, noise, size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render_line(text: str, style: LineStyle, rng: np.random.Generator) -> np.ndarray:
    """A tight crop of one text line, as a detector would cut it: uint8 RGB [H, W, 3]."""
    face = font(style.font_path, style.size)
    ascent, descent = face.getmetrics()
    left, _, right, _ = face.getbbox(text)
    top_pad = round(style.margin_top * style.size)
    bottom_pad = round(style.margin_bottom * style.size)
    width = right - left + style.margin_x[0] + style.margin_x[1]
    height = ascent + descent + top_pad + bottom_pad
    image = Image.new("RGB", (max(width, 1), height), style.paper)
    ImageDraw.Draw(image).text((style.margin_x[0] - left, top_pad), text, font=face,
                               fill=style.ink)
    return _blur_and_noise(image, style.blur, style.noise, rng)


@dataclass(frozen=True)
class HardStyle:
    """A :class:`LineStyle` drawn from the hard split's fonts, plus a rotation in degrees."""

    line: LineStyle
    angle: float


def hard_style(rng: np.random.Generator) -> HardStyle:
    """Low contrast (ink and paper 80-160 grey levels apart, inverted on 15% of lines), blur on
    40% of lines, noise of std 2-8, rotation within +-1 degree, sizes 16-40, fonts of
    ``hard_font_files``."""
    fonts = hard_font_files()
    paper_level = int(rng.integers(170, 246))
    ink_level = paper_level - int(rng.integers(80, 161))
    ink, paper = _grey(rng, ink_level, ink_level), _grey(rng, paper_level, paper_level)
    if rng.random() < 0.15:
        ink, paper = paper, ink
    size = int(rng.integers(16, 41))
    line = LineStyle(
        font_path=fonts[int(rng.integers(len(fonts)))], size=size, ink=ink, paper=paper,
        margin_x=(round(rng.uniform(0.02, 0.3) * size), round(rng.uniform(0.02, 0.3) * size)),
        margin_top=float(rng.uniform(0.0, 0.25)), margin_bottom=float(rng.uniform(0.0, 0.25)),
        noise=float(rng.uniform(2.0, 8.0)),
        blur=float(rng.uniform(0.3, 0.8)) if rng.random() < 0.4 else 0.0)
    return HardStyle(line, float(rng.uniform(-1.0, 1.0)))


def render_hard_line(text: str, style: HardStyle, rng: np.random.Generator) -> np.ndarray:
    """A hard line: drawn as :func:`render_line` draws it, rotated (the corners filled with
    paper, the crop grown to keep the ink) before the blur and noise."""
    sharp = LineStyle(**{**style.line.__dict__, "blur": 0.0, "noise": 0.0})
    image = Image.fromarray(render_line(text, sharp, rng), "RGB")
    image = image.rotate(style.angle, resample=Image.Resampling.BILINEAR, expand=True,
                         fillcolor=style.line.paper)
    return _blur_and_noise(image, style.line.blur, style.line.noise, rng)


# Every printable ASCII character but the space: the glyphs the recognizer's splits are scored on.
PRINTABLE = string.digits + string.ascii_letters + string.punctuation


def alphabet_text(rng: np.random.Generator, min_len: int = 4, max_len: int = 30,
                  allowed: Callable[[str], bool] | None = None) -> str:
    """``min_len``-``max_len`` characters drawn uniformly from ``PRINTABLE`` in runs of 1-8
    between single spaces: no word's order, but every glyph as often as any other."""
    for _ in range(100):
        target = int(rng.integers(min_len, max_len + 1))
        text = ""
        while len(text) < target:
            run = "".join(rng.choice(list(PRINTABLE), size=int(rng.integers(1, 9))))
            text = f"{text} {run}" if text else run
        text = text[:target].rstrip()
        if len(text) >= min_len and (allowed is None or allowed(text)):
            return text
    raise UserError("could not generate a text line from the allowed characters")


def train_text(rng: np.random.Generator, allowed: Callable[[str], bool] | None = None) -> str:
    """One line of the wider training stream: a third :func:`alphabet_text` lines (so a student
    distilled on it meets every printable character, not only the regular pieces' few symbols:
    measured, a pruned rec student trained without them read 12 % of the hard lines holding
    one, 83 % of the others), the rest the regular pieces, 3-25 or 14-34 characters (longer than
    the calibration lines; squeezed into 320 columns)."""
    kind = rng.random()
    if kind < 1 / 3:
        return alphabet_text(rng, allowed=allowed)
    if kind < 2 / 3:
        return random_text(rng, allowed=allowed)
    return random_text(rng, min_len=14, max_len=34, allowed=allowed)


@dataclass(frozen=True)
class TrainStyle:
    """A :class:`LineStyle` of the train faces, plus a horizontal stretch, a slant and a change
    of stroke weight of the drawn line."""

    line: LineStyle
    stretch: float  # width factor: < 1 squeezes the line, > 1 widens it
    shear: float = 0.0  # horizontal shift per row of height: > 0 slants right (italic-like)
    stroke: int = 0  # +1 strokes one pixel bolder, -1 one pixel lighter, 0 as drawn


def train_style(rng: np.random.Generator) -> TrainStyle:
    """The calibration faces (``FACES``) and matplotlib's STIX serif (``TRAIN_EXTRA_FACES``)
    over a wider range than the calibration stream: ink and
    paper 50-230 grey levels apart (inverted on 15% of lines), sizes 12-44, noise of std 0-10,
    blur on 35% of lines, the crop stretched to 0.75-1.3 of its width; on 30% of lines slanted
    (shear within +-0.3) and on 30% a pixel bolder or lighter (lines of 20 px and up): the
    weights and slants of faces it does not hold, as OCR training augments. No rotation, none
    of the hard split's faces: what the hard lines add stays unseen."""
    base = random_style(rng)
    paper_level = int(rng.integers(150, 256))
    ink_level = max(0, paper_level - int(rng.integers(50, 231)))
    ink, paper = _grey(rng, ink_level, ink_level), _grey(rng, paper_level, paper_level)
    if rng.random() < 0.15:
        ink, paper = paper, ink
    fonts = train_font_files()
    line = LineStyle(**{**base.__dict__, "ink": ink, "paper": paper,
                        "font_path": fonts[int(rng.integers(len(fonts)))],
                        "noise": float(rng.uniform(0.0, 10.0)),
                        "blur": float(rng.uniform(0.3, 1.2)) if rng.random() < 0.35 else 0.0})
    shear = float(rng.uniform(-0.3, 0.3)) if rng.random() < 0.3 else 0.0
    stroke = int(rng.choice([-1, 1])) if rng.random() < 0.3 else 0
    return TrainStyle(line, float(rng.uniform(0.75, 1.3)), shear, stroke)


def render_train_line(text: str, style: TrainStyle, rng: np.random.Generator) -> np.ndarray:
    """A training line: drawn sharp as :func:`render_line` draws it, slanted (the crop grown to
    keep the ink), its strokes thickened or thinned, stretched in width, then blurred and
    noised."""
    line = style.line
    sharp = LineStyle(**{**line.__dict__, "blur": 0.0, "noise": 0.0})
    image = Image.fromarray(render_line(text, sharp, rng), "RGB")
    width, height = image.size
    if style.shear:
        extra = round(abs(style.shear) * height)
        # output (x, y) reads input (x + shear * y - offset, y): rows shift by shear per row
        image = image.transform((width + extra, height), Image.Transform.AFFINE,
                                (1, style.shear, -extra if style.shear > 0 else 0, 0, 1, 0),
                                resample=Image.Resampling.BILINEAR, fillcolor=line.paper)
    if style.stroke and line.size >= 20:
        dark_ink = sum(line.ink) < sum(line.paper)
        bolder = ImageFilter.MinFilter(3) if dark_ink else ImageFilter.MaxFilter(3)
        lighter = ImageFilter.MaxFilter(3) if dark_ink else ImageFilter.MinFilter(3)
        image = image.filter(bolder if style.stroke > 0 else lighter)
    image = image.resize((max(1, round(image.size[0] * style.stretch)), height),
                         Image.Resampling.BILINEAR)
    return _blur_and_noise(image, line.blur, line.noise, rng)


@dataclass(frozen=True)
class PlacedLine:
    text: str
    style: LineStyle
    x: int
    y: int
    box: tuple[int, int, int, int]  # ink bounding box on the page: x0, y0, x1, y1 (exclusive)


def layout_page(rng: np.random.Generator, texts: Iterable[str], size: int = 640,
                size_range: tuple[int, int] = (16, 44), tries: int = 60) -> list[PlacedLine]:
    """Place the lines at random, non-overlapping positions (lines that don't fit are dropped)."""
    placed: list[PlacedLine] = []
    for text in texts:
        style = random_style(rng, size_range)
        face = font(style.font_path, style.size)
        x0, y0, x1, y1 = face.getbbox(text)
        w, h = x1 - x0, y1 - y0
        if w >= size - 8 or h >= size - 8:
            continue
        for _ in range(tries):
            x = int(rng.integers(4, size - w - 4))
            y = int(rng.integers(4, size - h - 4))
            box = (x, y, x + w, y + h)
            gap = max(4, style.size // 3)
            if all(box[0] >= b.box[2] + gap or box[2] + gap <= b.box[0]
                   or box[1] >= b.box[3] + gap or box[3] + gap <= b.box[1] for b in placed):
                placed.append(PlacedLine(text, style, x - x0, y - y0, box))
                break
    return placed


def render_page(lines: list[PlacedLine], rng: np.random.Generator, size: int = 640
                ) -> np.ndarray:
    """A page with the placed lines on a smooth, lightly shaded background: uint8 RGB."""
    base = np.asarray(_grey(rng, 200, 255), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    shade = rng.uniform(-20, 20) * xx + rng.uniform(-20, 20) * yy
    page = np.clip(base[None, None, :] + shade[..., None], 0, 255).astype(np.uint8)
    image = Image.fromarray(page, "RGB")
    draw = ImageDraw.Draw(image)
    for line in lines:
        face = font(line.style.font_path, line.style.size)
        ink = line.style.ink if sum(line.style.ink) < 3 * 128 else (20, 20, 20)
        draw.text((line.x, line.y), line.text, font=face, fill=ink)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 3.0, size=(size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)
