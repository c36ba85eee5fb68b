"""The gallery of a sweep: ``<out>/index.html``, the facets the way the paper shows them.

Per unit (in unit order): its number, class name and synset; a row of its facets (the
8-bit ``facet_<f>.png`` each, captioned with the facet, its seed and the final objective:
the unit's value before the last step); beneath, the mean images they started from
(``mean_<f>.png``). Facets not done yet show an empty frame, failed ones their error. The
page is one file with inline CSS and no script; its images are relative links into the
unit folders beside it (``<unit>/facet_<f>.png``), so it opens from the disk in any
browser without a server, and stays small for 1,000 units; ``embed=True`` puts the images
in the page instead (data: URIs), for a page that travels alone.
"""
from __future__ import annotations

from pathlib import Path

from porting.errors import PortingError

from mfv.files import _atomic
from mfv.report import _CSS, _esc, _g, _uri

_GALLERY_CSS = """
body{max-width:none}
section.unit{margin:1.2em 0;border-top:1px solid #ddd}
.strip{display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start}
.strip figure{margin:0;width:132px;max-width:132px}
.strip figure img{width:128px;height:128px;image-rendering:auto;border:2px solid #fff}
.strip figure.mean img{border-color:#eee}
.strip figcaption{font-size:.72em;color:#444;line-height:1.25}
.missing{width:128px;height:128px;background:#f3f3f3;border:1px dashed #bbb;font-size:.7em;color:#a00;
         overflow:hidden;padding:2px;box-sizing:border-box}
"""


def _image(out: Path, relative: str, alt: str, embed: bool) -> str:
    if embed:
        path = out / relative
        if not path.is_file():
            return f"<div class=\"missing\">{_esc(relative)} missing</div>"
        src = _uri(path.read_bytes())
    else:
        src = "/".join(_esc(part) for part in relative.split("/"))
    return f"<img src=\"{src}\" alt=\"{_esc(alt)}\" loading=\"lazy\">"


def render_gallery(manifest: dict, out, embed: bool = False) -> str:
    """The page's HTML for ``manifest`` (a sweep's manifest.json) of the sweep folder ``out``."""
    out = Path(out)
    st = manifest.get("settings", {})
    facets = int(st.get("facets", 0))
    failed = {}
    for entry in manifest.get("failed", []):
        for f in entry["facets"]:
            failed[(entry["unit"], f)] = entry["error"]
    done_count = sum(len(by) for by in manifest.get("facets", {}).values())
    title = f"MFV facets of {st.get('layer')} units ({st.get('variant')} initialisation, {st.get('mode')})"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
             f"<style>{_CSS}{_GALLERY_CSS}</style></head><body><h1>{_esc(title)}</h1>"
             f"<p class=\"small\">{len(manifest.get('units', {}))} units, {done_count} facets done, "
             f"{len(failed)} failed. Model {_esc(Path(str(st.get('prototxt'))).name)} / "
             f"{_esc(Path(str(st.get('caffemodel'))).name)}; seed {_esc(st.get('seed'))}; iterations "
             f"{_esc(st.get('iterations') or 'the whole schedule')}. Each facet above the mean image it started "
             f"from; the number under a facet is its final objective (the unit's {_esc(st.get('layer'))} value "
             f"before the last step).</p>"]
    for key in sorted(manifest.get("units", {}), key=int):
        info = manifest["units"][key]
        unit = int(key)
        records = manifest.get("facets", {}).get(key, {})
        heading = (f"unit {unit}" + (f": {info['name']}" if info.get("name") else "")
                   + (f" ({info['synset']})" if info.get("synset") else ""))
        row, means = [], []
        for f in range(facets):
            record = records.get(str(f))
            if record is not None:
                row.append(f"<figure>{_image(out, f'{unit}/facet_{f}.png', f'unit {unit} facet {f}', embed)}"
                           f"<figcaption>facet {f} &middot; seed {_esc(record.get('seed'))}<br>objective "
                           f"<b>{_esc(_g(record.get('objective'), 4))}</b></figcaption></figure>")
                means.append(f"<figure class=\"mean\">{_image(out, f'{unit}/mean_{f}.png', f'mean image {f}', embed)}"
                             f"<figcaption>mean image {f}</figcaption></figure>")
            else:
                error = failed.get((unit, f))
                text = f"failed: {error}" if error else "not done yet"
                row.append(f"<figure><div class=\"missing\">{_esc(text)}</div><figcaption>facet {f}</figcaption>"
                           f"</figure>")
                means.append("<figure class=\"mean\"><div class=\"missing\"></div></figure>")
        parts.append(f"<section class=\"unit\" id=\"unit-{unit}\"><h2>{_esc(heading)}</h2>"
                     f"<div class=\"strip\">{''.join(row)}</div><div class=\"strip\">{''.join(means)}</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_gallery(out, manifest: dict | None = None, embed: bool = False) -> Path:
    """Write ``<out>/index.html`` (whole or not at all) from ``manifest`` or ``<out>/manifest.json``."""
    from mfv.sweep import load_manifest

    out = Path(out)
    if manifest is None:
        manifest = load_manifest(out)
        if manifest is None:
            raise PortingError("no sweep manifest here (mfv sweep writes one)", out / "manifest.json")
    text = render_gallery(manifest, out, embed)
    return _atomic(out / "index.html", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
