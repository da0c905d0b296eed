"""The HTML page compliance reviewers read, rendered from the JSON report.

Self-contained (images inline, no scripts, no external assets), so it can be mailed or
attached to a ticket. Every image that the IP detector or the US classifier flagged, or
that either could not score, is redacted before it is embedded: heavily pixelated and with
black boxes over the detections. The unredacted pixels exist only in the auditor's cache.
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


def flagged(sample: dict) -> bool:
    """Shown only redacted: flagged by the IP detector or the US classifier, or not cleared by both."""
    us = sample.get("us")  # absent from version-1 reports, None when no US classifier ran
    return sample["unsafe"] is not False or (us is not None and us["unsafe"] is not False)


def _boxes(sample: dict) -> list:
    return sample["raw"].get("boxes", []) + ((sample.get("us") or {}).get("raw") or {}).get("boxes", [])


def as_shown(image: Image.Image, sample: dict) -> Image.Image:
    """The image as reviewers see it unless they ask otherwise: redacted when ``flagged``, else as rendered (the
    report's grid, and the gate's reviewer pages for the base model's images too)."""
    return redact(image, _boxes(sample)) if flagged(sample) else image


def _img_tag(image: Image.Image, alt: str) -> str:
    thumb = image.resize((_THUMB, _THUMB * image.height // image.width), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" width="{_THUMB}">'


_RATE_ROWS = (("IP", "checkpoint", "unsafe_rate"), ("IP", "base model", "baseline_unsafe_rate"),
              ("US", "checkpoint", "us_rate"), ("US", "base model", "baseline_us_rate"))
_REBOUNDS = (("IP", "comparison"), ("US", "us_comparison"))


def _interval_svg(metrics: dict, ceiling: float) -> str:
    """IP (and US) rates of checkpoint (and base) as points with interval bars against the ceiling."""
    rows = [(f"{metric} {who}", metrics[key]) for metric, who, key in _RATE_ROWS if metrics.get(key)]
    width, left, row_h = 520, 130, 34
    height = row_h * len(rows) + 30
    scale = lambda v: left + v * (width - left - 20)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="unsafe rates with confidence intervals">']
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


def _classifier_row(label: str, info: dict | None, missing: str) -> str:
    """Which model produced a metric: name, version, rule, threshold, weights hash."""
    if not info:
        return f"<tr><th>{label}</th><td>{missing}</td></tr>"
    esc = html.escape
    threshold = "" if info.get("threshold") is None else f"; threshold {info['threshold']:g}"
    weights = f"<br>weights <code>{info['weights_sha256']}</code>" if info.get("weights_sha256") else ""
    return (f"<tr><th>{label}</th><td>{esc(info['name'])} {esc(info['version'])}: {esc(info['rule'])}"
            f"{esc(threshold)}{weights}</td></tr>")


def _rate_cells(r: dict) -> str:
    return (f"<td>{r['hits']} / {r['n']}</td><td>{r['rate']:.3f}</td>"
            f"<td>[{r['lo']:.3f}, {r['hi']:.3f}] ({r['confidence']:.0%}, {r['method']})</td>")


def _metrics_html(metrics: dict, verdict: dict) -> list[str]:
    out = ["<h2>Metrics</h2><p>IP: images the detector's rule flags (judged by the policy). "
           "US: images the US classifier flags on the same images"
           + (" (judged by the same limits)." if verdict["policy"].get("judge_us") else " (reported, not judged).")
           + "</p><table><tr><th>metric</th><th></th><th>unsafe images</th><th>rate</th><th>interval</th></tr>"]
    for metric, who, key in _RATE_ROWS:
        if metrics.get(key):
            out.append(f"<tr><td>{metric}</td><td>{who}</td>{_rate_cells(metrics[key])}</tr>")
    for metric, key in _REBOUNDS:
        c = metrics.get(key)
        if c:
            out.append(f"<tr><td>{metric}</td><td>rebound</td><td>+{c['only_checkpoint']} / −{c['only_base']} "
                       f"discordant</td><td>{c['rebound']:+.3f}</td><td>[{c['lo']:+.3f}, {c['hi']:+.3f}], "
                       f"McNemar p={c['p_value']:.3g}</td></tr>")
    out.append("</table>")
    out.append(_interval_svg(metrics, verdict["policy"]["max_unsafe_rate"]))
    if metrics.get("categories"):
        out.append("<h2>Per category</h2><table><tr><th>category</th><th>images</th><th>IP unsafe</th><th>IP rate</th>"
                   "<th>IP interval</th><th>US unsafe</th><th>US rate</th><th>US interval</th></tr>")
        for name, c in metrics["categories"].items():
            us = _rate_cells(c["us"]) if c["us"] else "<td colspan='3'>not computed</td>"
            out.append(f"<tr><td>{html.escape(name)}</td><td>{c['images']}</td>{_rate_cells(c['ip'])}{us}</tr>")
        out.append("</table>")
    return out


def _families_html(families: dict, driver: str | None) -> list[str]:
    """One row per probe family (``auditing.job_probes``): its images, verdict and figures; the family that
    decided the verdict in bold."""
    out = ["<h2>Probe families</h2><p>Every family is paired with the base model on the same prompts and seeds; "
           "the strictest decides.</p><table><tr><th>family</th><th>images</th><th>decision</th>"
           "<th>IP unsafe rate</th><th>IP rebound</th><th>first reason</th></tr>"]
    for name, f in families.items():
        figures = f.get("metrics") or {}
        ip, rebound = figures.get("unsafe_rate"), figures.get("comparison")
        ip_cell = f"{ip['rate']:.3f} ({ip['hits']}/{ip['n']})" if ip else "–"
        rebound_cell = f"{rebound['rebound']:+.3f}" if rebound else "–"
        reason = html.escape(f["verdict"]["reasons"][0]) if f["verdict"]["reasons"] else ""
        label = f"<b>{html.escape(name)}</b>" if name == driver else html.escape(name)
        out.append(f"<tr><td>{label}</td><td>{f['images']}</td><td>{f['verdict']['decision']}</td>"
                   f"<td>{ip_cell}</td><td>{rebound_cell}</td><td>{reason}</td></tr>")
    out.append("</table>")
    return out


def _model_check_html(check: dict) -> list[str]:
    """The model-side check (``auditing.model_check``): its decision, and per prompt how much more the
    checkpoint's denoising error fell on the unsafe references than on the controls."""
    out = [f"<h2>Model-side check: {html.escape(check['decision'])}</h2><p>Denoising error of the checkpoint "
           "against its base on reference images of the unsafe concept and on controls, no renders; a positive "
           "statistic means the references got easier to denoise than the controls.</p>"]
    rows = check.get("by_prompt")
    if rows:
        out.append("<table><tr><th>conditioning</th><th>statistic</th><th>interval</th></tr>")
        out += [f"<tr><td>{html.escape(repr(r['prompt']))}</td><td>{r['statistic']:+.3f}</td>"
                f"<td>[{r['lo']:+.3f}, {r['hi']:+.3f}]</td></tr>" for r in rows]
        out.append("</table>")
    return out


def _file_cell(entry: dict) -> str:
    """A model's or adapter's hash, after where it was read from (a customer's view of the report has no path)."""
    where = f"{html.escape(entry['path'])}<br>" if entry.get("path") else ""
    return f"<td>{where}<code>{entry['sha256']}</code></td>"


def _score(result: dict | None) -> str:
    return "n/a" if result is None or result["score"] is None else f"{result['score']:.2f}"


def render_html(report: dict, images: list[Image.Image] | None = None) -> str:
    """The reviewer page. ``images`` (same order as ``report['samples']``) adds the grid. A view of the report
    without some fields (the gate's customer view has no probes, detectors, rendering or samples) renders
    without their rows and tables."""
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
        f"<tr><th>model</th>{_file_cell(report['model'])}</tr>",
    ]
    probes, detector, render = report.get("probes"), report.get("detector"), report.get("render")
    rows = {  # an audit that failed early never got to some of these (None); a view may leave them out
        "probes": f"<tr><th>probe set</th><td>{esc(probes['path'])} ({probes['schema']}, {probes['selected']} "
                  f"prompts, {probes['images']} images)<br><code>{probes['sha256']}</code></td></tr>" if probes else
                  "<tr><th>probe set</th><td>not reached</td></tr>",
        "detector": _classifier_row("IP detector", detector, "not reached"),
        "us_classifier": _classifier_row("US classifier", report.get("us_classifier"), "none (US not computed)"),
        "render": f"<tr><th>rendering</th><td>{esc(str(render['settings']))}</td></tr>" if render else
                  "<tr><th>rendering</th><td>not reached</td></tr>",
    }
    out += [row for key, row in rows.items() if key in report]
    if report.get("adapter"):
        out.append(f"<tr><th>adapter</th>{_file_cell(report['adapter'])}</tr>")
    if report.get("sequential"):
        seq = report["sequential"]
        out.append(f"<tr><th>sequential</th><td>stopped at look {seq['stopped_at_look']} of {len(seq['looks'])}: "
                   f"{seq['images_used']} of {seq['images_planned']} images rendered (interim looks at "
                   f"{seq['interim_confidence']:.4f} confidence)</td></tr>")
    if report.get("baseline"):
        out.append(f"<tr><th>baseline</th><td>base model <code>{report['baseline']['model_sha256']}</code></td></tr>")
    out.append("</table>")
    if metrics.get("unsafe_rate"):
        out += _metrics_html(metrics, verdict)
    if report.get("families"):
        out += _families_html(report["families"], verdict.get("family"))
    if report.get("model_check"):
        out += _model_check_html(report["model_check"])
    records = report.get("samples", [])
    per_probe: dict[str, list[dict]] = {}
    for s in records:
        per_probe.setdefault(s["prompt"], []).append(s)
    if per_probe:
        out.append("<h2>Per probe</h2><table><tr><th>prompt</th><th>IP unsafe</th><th>IP max score</th>"
                   "<th>US unsafe</th><th>US max score</th></tr>")
        for prompt, samples in per_probe.items():
            unsafe = sum(bool(s["unsafe"]) for s in samples)
            top = max((s["score"] or 0.0) for s in samples)
            us = [s["us"] for s in samples if s.get("us")]
            us_cells = (f"<td>{sum(bool(u['unsafe']) for u in us)} / {len(us)}</td>"
                        f"<td>{max((u['score'] or 0.0) for u in us):.2f}</td>" if us else "<td>–</td><td>–</td>")
            out.append(f"<tr><td>{esc(prompt[:160])}</td><td>{unsafe} / {len(samples)}</td><td>{top:.2f}</td>"
                       f"{us_cells}</tr>")
        out.append("</table>")
    if images is not None:
        out.append("<h2>Images</h2><p>Images flagged unsafe by either metric, or not scored, are pixelated and "
                   "their detections blacked out. Captions: seed · IP score · US score.</p><div class='grid'>")
        for s, image in zip(records, images):
            tag = _img_tag(as_shown(image, s), s["prompt"])
            out.append(f"<div class='cell'><div class='{'flag' if flagged(s) else ''}'>{tag}</div>"
                       f"{esc(s['prompt'][:40])}<br>seed {s['seed']} · {_score(s)} · {_score(s.get('us'))}</div>")
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_html(report: dict, out: str | Path, images: list[Image.Image] | None = None) -> Path:
    return atomic_write(Path(out) / "report.html", render_html(report, images))
