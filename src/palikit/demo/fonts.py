"""The TrueType faces the shapes v2 words and the scene-text crops are drawn in: matplotlib's bundled
faces and any `.ttf` under /usr/share/fonts, less those that cannot draw every ASCII letter and digit."""

from __future__ import annotations

import functools
import string
from pathlib import Path

from PIL import ImageFont

FACES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono.ttf",
         "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansDisplay.ttf",
         "STIXGeneral.ttf", "STIXGeneralBol.ttf", "cmr10.ttf", "cmtt10.ttf", "cmss10.ttf")


@functools.lru_cache(maxsize=None)
def font_files() -> tuple[Path, ...]:
    """TrueType fonts to draw with: matplotlib's bundled faces (those in `FACES`) and any .ttf under
    /usr/share/fonts (Debian fonts-* packages), sorted so a seed gives the same set, less the faces
    that draw no ink for some ASCII letter or digit (matplotlib's DejaVuSansDisplay has almost no
    glyphs: crops drawn with it were blank images labelled with text)."""
    found: list[Path] = []
    try:
        import matplotlib

        ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        found += [ttf / f for f in FACES if (ttf / f).is_file()]
    except ImportError:
        pass
    found += sorted(Path("/usr/share/fonts").rglob("*.ttf")) if Path("/usr/share/fonts").is_dir() else []
    seen, out = set(), []
    for f in found:
        if f.name not in seen:
            seen.add(f.name)
            if _draws_every(f, string.ascii_letters + string.digits):
                out.append(f)
    if not out:
        raise RuntimeError("no TrueType font found: pip install matplotlib (bundles DejaVu) or apt-get install "
                           "fonts-dejavu-core")
    return tuple(out)


def _draws_every(path: Path, chars: str) -> bool:
    try:
        font = ImageFont.truetype(str(path), 24)
    except OSError:
        return False
    return all(font.getmask(ch).getbbox() for ch in chars)
