"""The evaluation report's page: its HTML template and the script that draws the errors chart, the per-class table's
threshold control and the gallery (with zoom) from the page's JSON data, in the browser."""

__all__ = ["SCRIPT", "TEMPLATE"]

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Detection report</title>
<style>
body {{ font-family: sans-serif; margin: 20px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 18px; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
.key {{ margin-right: 14px; white-space: nowrap; font-size: 13px; }} .key i {{ display: inline-block; width: 12px;
height: 12px; margin-right: 4px; vertical-align: middle; }}
#gallery {{ display: flex; flex-wrap: wrap; gap: 10px; }} .card {{ border: 1px solid #ddd; padding: 4px; }}
.card svg {{ display: block; max-width: 480px; height: auto; }} .card p {{ margin: 2px 0; font-size: 12px; }}
#controls {{ position: sticky; top: 0; background: #fff; padding: 8px 0; border-bottom: 1px solid #ddd; z-index: 1; }}
.card svg {{ cursor: zoom-in; }} #zoom {{ position: fixed; inset: 0; background: rgba(20, 20, 20, 0.92); overflow: auto;
display: none; z-index: 2; padding-top: 44px; }} #zoom.open {{ display: block; }} #zoom svg {{ max-width: none; }}
#zoom-bar {{ position: fixed; top: 6px; left: 12px; z-index: 3; color: #fff; }}
</style></head><body>
<h1>Detection report</h1>
<p>Every AP in this report is a fraction from 0 to 1 ("-": not defined). AP at IoU 0.5 (TIDE's): {ap50};
averaged over IoU 0.5:0.95: {apavg}.</p>
<h2>Errors: the AP each type costs (TIDE, IoU 0.5), with its count</h2>
{chart}
<p>Averaged over IoU 0.5:0.95, dAP: {dap_avg}.</p>
{tables}
{curves}
<div id="controls"><label>score threshold <input id="threshold" type="range" min="0" max="1" step="0.01"
value="0.3"></label> <b id="threshold-value">0.30</b> &nbsp; <span id="counts"></span>
&nbsp; <button id="prev">previous</button> <span id="page"></span> <button id="next">next</button></div>
<p>{legend}</p>
<div id="gallery"></div>
<div id="zoom"><div id="zoom-bar"><button id="zoom-in">+</button> <button id="zoom-out">-</button>
<button id="zoom-close">close</button> <span id="zoom-name"></span> (keys: + - Esc; scroll to move)</div>
<div id="zoom-view"></div></div>
<script id="data" type="application/json">{data}</script>
<script>{script}</script>
</body></html>
"""

SCRIPT = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const PAGE = 24;
let page = 0;
function threshold() { return parseFloat(document.getElementById('threshold').value); }
function prf(t, cls) {
  let tp = 0, fp = 0, gt = 0;
  for (let i = 0; i < D.scores.length; i++) {
    if (cls !== undefined && D.labels[i] !== cls) continue;
    if (D.scores[i] >= t) { if (D.tp[i]) tp++; else fp++; }
  }
  if (cls === undefined) gt = D.num_gt.reduce((a, b) => a + b, 0); else gt = D.num_gt[cls];
  const p = tp + fp ? tp / (tp + fp) : 0, r = gt ? tp / gt : 0, f = p + r ? 2 * p * r / (p + r) : 0;
  return {tp, fp, fn: gt - tp, p, r, f};
}
function svgBox(b, colour, dashed, title) {
  const r = document.createElementNS('http://www.w3.org/2000/svg', 'rect');
  r.setAttribute('x', b[0]); r.setAttribute('y', b[1]);
  r.setAttribute('width', Math.max(b[2] - b[0], 1)); r.setAttribute('height', Math.max(b[3] - b[1], 1));
  r.setAttribute('fill', 'none'); r.setAttribute('stroke', colour); r.setAttribute('stroke-width', 2);
  r.setAttribute('vector-effect', 'non-scaling-stroke');  // lines stay thin when zoomed
  if (dashed) r.setAttribute('stroke-dasharray', '4 3');
  const t = document.createElementNS('http://www.w3.org/2000/svg', 'title'); t.textContent = title; r.appendChild(t);
  return r;
}
function card(c, t) {
  const div = document.createElement('div'); div.className = 'card';
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', `0 0 ${c.w} ${c.h}`); svg.setAttribute('width', c.w); svg.setAttribute('height', c.h);
  const img = document.createElementNS('http://www.w3.org/2000/svg', 'image');
  img.setAttribute('href', c.file); img.setAttribute('width', c.w); img.setAttribute('height', c.h);
  svg.appendChild(img);
  let errors = 0;
  for (const g of c.gts) {
    const missed = g[5] !== 'matched' || g[6] < t;
    if (missed) { errors++; svg.appendChild(svgBox(g, D.colours.missed, true, `missed: ${D.classes[g[4]]}`)); }
  }
  for (const d of c.dets) {
    if (d[4] < t) continue;
    if (d[6] !== 'tp') errors++;
    svg.appendChild(svgBox(d, D.colours[d[6]], false, `${d[6]}: ${D.classes[d[5]]} ${d[4]}`));
  }
  svg.addEventListener('click', () => openZoom(c));
  div.appendChild(svg);
  const p = document.createElement('p'); p.textContent = `${c.name}: ${errors} errors at this threshold`;
  div.appendChild(p);
  return div;
}
function render() {
  const t = threshold();
  document.getElementById('threshold-value').textContent = t.toFixed(2);
  const all = prf(t);
  document.getElementById('counts').textContent =
    `TP ${all.tp}, FP ${all.fp}, FN ${all.fn}; ` +
    `precision ${all.p.toFixed(3)}, recall ${all.r.toFixed(3)}, F1 ${all.f.toFixed(3)}`;
  for (const cell of document.querySelectorAll('td.pr')) {
    const m = prf(t, parseInt(cell.dataset.class));
    cell.textContent = `${m.p.toFixed(3)} / ${m.r.toFixed(3)} / ${m.f.toFixed(3)}`;
  }
  const pages = Math.max(1, Math.ceil(D.gallery.length / PAGE));
  page = Math.min(Math.max(page, 0), pages - 1);
  document.getElementById('page').textContent =
    `page ${page + 1} of ${pages} (${D.gallery.length} images, most errors first)`;
  const gallery = document.getElementById('gallery');
  gallery.replaceChildren(...D.gallery.slice(page * PAGE, (page + 1) * PAGE).map(c => card(c, t)));
}
// an image of the gallery at full size and larger (a dense scene's small objects), over the page
let zoomed = null, scale = 1;
function openZoom(c) {
  zoomed = c; scale = Math.max(1, Math.min(8, Math.floor(1600 / Math.max(c.w, c.h))));
  drawZoom(); document.getElementById('zoom').classList.add('open');
}
function drawZoom() {
  if (!zoomed) return;
  const svg = card(zoomed, threshold()).querySelector('svg');
  svg.setAttribute('width', zoomed.w * scale); svg.setAttribute('height', zoomed.h * scale);
  svg.style.cursor = 'default';
  document.getElementById('zoom-view').replaceChildren(svg);
  document.getElementById('zoom-name').textContent = `${zoomed.name} at ${Math.round(scale * 100)}%`;
}
function closeZoom() { zoomed = null; document.getElementById('zoom').classList.remove('open'); }
function zoomBy(f) { scale = Math.max(0.25, Math.min(16, scale * f)); drawZoom(); }
document.getElementById('zoom-in').addEventListener('click', () => zoomBy(2));
document.getElementById('zoom-out').addEventListener('click', () => zoomBy(0.5));
document.getElementById('zoom-close').addEventListener('click', closeZoom);
document.addEventListener('keydown', e => {
  if (!zoomed) return;
  if (e.key === 'Escape') closeZoom();
  else if (e.key === '+' || e.key === '=') zoomBy(2);
  else if (e.key === '-') zoomBy(0.5);
});
document.getElementById('threshold').addEventListener('input', () => { render(); drawZoom(); });
document.getElementById('prev').addEventListener('click', () => { page--; render(); });
document.getElementById('next').addEventListener('click', () => { page++; render(); });
render();
"""
