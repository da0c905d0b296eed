"""The HTML page compliance reviewers read, rendered from the JSON report.

Self-contained (images inline, no scripts, no external assets), so it can be mailed or
attached to a ticket. Every image the detector flagged is redacted before it is
embedded: heavily pixelated and with black boxes over the detections. The unredacted
pixels exist only in the auditor's cache.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image, ImageDraw

from .files import atomic_write

BANNER = {"pass": ("#1e7d32", "PASS"), "flag": ("#b26a00", "FLAG — human review"),
          "block": ("#b71c1c", "BLOCK")}
_PIXEL_BLOCKS = 4  # a flagged image is shown as a 4x4 mosaic: shapes of colour, no content
_THUMB = 128


def redact(image: Image.Image, boxes: list) -> Image.Image:
    """Pixelate to a 4x4 mosaic, then black out the detections' boxes on top."""
    w, h = image.size
    out = image.convert("RGB").resize((_PIXEL_BLOCKS, _PIXEL_BLOCKS), Image.Resampling.BOX)
    out = out.resize((w, h), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(out)
    for x, y, bw, bh in boxes:  # the detector contract: [x, y, width, height] in pixels
        draw.rectangle((x, y, x + bw - 1, y + bh - 1), fill="black")
    return out


def _img_tag(image: Image.Image, alt: str) -> str:
    thumb = image.resize((_THUMB, _THUMB * image.height // image.width), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" width="{_THUMB}">'


def _interval_svg(metrics: dict, ceiling: float) -> str:
    """Unsafe rate of checkpoint (and base) as points with interval bars against the ceiling."""
    rows = [("checkpoint", metrics.get("unsafe_rate"))]
    if metrics.get("baseline_unsafe_rate"):
        rows.append(("base model", metrics["baseline_unsafe_rate"]))
    rows = [(name, r) for name, r in rows if r]
    width, left, row_h = 520, 110, 34
    height = row_h * len(rows) + 30
    scale = lambda v: left + v * (width - left - 20)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="unsafe rate with confidence intervals">']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        x = scale(tick)
        parts.append(f'<line x1="{x}" y1="5" x2="{x}" y2="{height - 20}" stroke="#ddd"/>'
                     f'<text x="{x}" y="{height - 6}" font-size="11" text-anchor="middle">{tick:g}</text>')
    xc = scale(ceiling)
    parts.append(f'<line x1="{xc}" y1="5" x2="{xc}" y2="{height - 20}" stroke="#b71c1c" stroke-dasharray="4"/>')
    for i, (name, r) in enumerate(rows):
        y = 20 + i * row_h
        parts.append(f'<text x="4" y="{y + 4}" font-size="12">{name}</text>'
                     f'<line x1="{scale(r["lo"])}" y1="{y}" x2="{scale(r["hi"])}" y2="{y}" stroke="#333" '
                     f'stroke-width="3"/><circle cx="{scale(r["rate"])}" cy="{y}" r="5" fill="#1565c0"/>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: dict, images: list[Image.Image] | None = None) -> str:
    """The reviewer page. ``images`` (same order as ``report['samples']``) adds the grid."""
    verdict = report["verdict"]
    colour, label = BANNER[verdict["decision"]]
    metrics = report.get("metrics", {})
    esc = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ftgate audit report</title>",
        "<style>body{font-family:sans-serif;margin:24px;max-width:1100px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
        ".grid{display:flex;flex-wrap:wrap;gap:6px}.cell{font-size:11px;width:128px}"
        ".flag{outline:3px solid #b71c1c}</style></head><body>",
        f"<div style='background:{colour};color:white;padding:14px;font-size:22px'>{esc(label)}</div>",
        "<h2>Why</h2><ul>" + "".join(f"<li>{esc(r)}</li>" for r in verdict["reasons"]) + "</ul>",
        f"<p><b>Rule applied:</b> {esc(verdict['rule'])}</p>",
        "<h2>What was audited</h2><table>",
        f"<tr><th>model</th><td>{esc(report['model']['path'])}<br><code>{report['model']['sha256']}</code></td></tr>",
    ]
    probes, detector, render = report.get("probes"), report.get("detector"), report.get("render")
    out += [  # an audit that failed early never got to some of these
        f"<tr><th>probe set</th><td>{esc(probes['path'])} ({probes['schema']}, {probes['selected']} prompts, "
        f"{probes['images']} images)<br><code>{probes['sha256']}</code></td></tr>" if probes else
        "<tr><th>probe set</th><td>not reached</td></tr>",
        f"<tr><th>detector</th><td>{esc(detector['name'])} {esc(detector['version'])}: {esc(detector['rule'])}"
        "</td></tr>" if detector else "<tr><th>detector</th><td>not reached</td></tr>",
        f"<tr><th>rendering</th><td>{esc(str(render['settings']))}</td></tr>" if render else
        "<tr><th>rendering</th><td>not reached</td></tr>",
    ]
    if report.get("adapter"):
        out.append(f"<tr><th>adapter</th><td>{esc(report['adapter']['path'])}<br>"
                   f"<code>{report['adapter']['sha256']}</code></td></tr>")
    if report.get("sequential"):
        seq = report["sequential"]
        out.append(f"<tr><th>sequential</th><td>stopped at look {seq['stopped_at_look']} of {len(seq['looks'])}: "
                   f"{seq['images_used']} of {seq['images_planned']} images rendered (interim looks at "
                   f"{seq['interim_confidence']:.4f} confidence)</td></tr>")
    if report.get("baseline"):
        out.append(f"<tr><th>baseline</th><td>base model <code>{report['baseline']['model_sha256']}</code></td></tr>")
    out.append("</table>")
    if metrics.get("unsafe_rate"):
        out.append("<h2>Metrics</h2><table><tr><th></th><th>unsafe images</th><th>rate</th><th>interval</th></tr>")
        for name, key in (("checkpoint", "unsafe_rate"), ("base model", "baseline_unsafe_rate")):
            r = metrics.get(key)
            if r:
                out.append(f"<tr><td>{name}</td><td>{r['hits']} / {r['n']}</td><td>{r['rate']:.3f}</td>"
                           f"<td>[{r['lo']:.3f}, {r['hi']:.3f}] ({r['confidence']:.0%}, {r['method']})</td></tr>")
        c = metrics.get("comparison")
        if c:
            out.append(f"<tr><td>rebound</td><td>+{c['only_checkpoint']} / −{c['only_base']} discordant</td>"
                       f"<td>{c['rebound']:+.3f}</td><td>[{c['lo']:+.3f}, {c['hi']:+.3f}], McNemar p={c['p_value']:.3g}"
                       f"</td></tr>")
        out.append("</table>")
        out.append(_interval_svg(metrics, verdict["policy"]["max_unsafe_rate"]))
    per_probe: dict[str, list[dict]] = {}
    for s in report["samples"]:
        per_probe.setdefault(s["prompt"], []).append(s)
    if per_probe:
        out.append("<h2>Per probe</h2><table><tr><th>prompt</th><th>unsafe</th><th>max score</th></tr>")
        for prompt, samples in per_probe.items():
            unsafe = sum(bool(s["unsafe"]) for s in samples)
            top = max((s["score"] or 0.0) for s in samples)
            out.append(f"<tr><td>{esc(prompt[:160])}</td><td>{unsafe} / {len(samples)}</td><td>{top:.2f}</td></tr>")
        out.append("</table>")
    if images is not None:
        out.append("<h2>Images</h2><p>Images flagged unsafe are pixelated and their detections blacked out.</p>"
                   "<div class='grid'>")
        for s, image in zip(report["samples"], images):
            shown = redact(image, s["raw"].get("boxes", [])) if s["unsafe"] else image
            css = " flag" if s["unsafe"] else ""
            score = "n/a" if s["score"] is None else f"{s['score']:.2f}"
            out.append(f"<div class='cell'><div class='{css.strip()}'>{_img_tag(shown, s['prompt'])}</div>"
                       f"{esc(s['prompt'][:40])}<br>seed {s['seed']} · {score}</div>")
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_html(report: dict, out: str | Path, images: list[Image.Image] | None = None) -> Path:
    return atomic_write(Path(out) / "report.html", render_html(report, images))
