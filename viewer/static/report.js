// The page of one profile (or a diff of two) written to a file: `record --format html`, `diff --html`.
// Data is in the #report-data script element (viewer/report.py); nothing is fetched.
// When drawn, window.bpfReport = {drawnMs} (time from navigation start, read by the bench and tests).
(function () {
  'use strict';
  const { h, flamePanel } = window.bpfdom;
  const app = document.getElementById('app');
  const tParse = performance.now();
  const data = JSON.parse(document.getElementById('report-data').textContent);

  const compact = data.flamegraph;
  compact.changes = data.changes;
  const diff = !!compact.nodes.base;
  // Frames under 0.001 % of the total are not drawn: 1.3 px even zoomed into a 1 % subtree, and on a
  // 10-minute machine-wide profile they are most of the nodes. The top table and search count them.
  const panel = flamePanel({ minFraction: 1e-5, baseLabel: 'the base', newLabel: 'new' });
  const typeSel = h('select', { id: 'type', onchange: () => { setType(typeSel.value); draw(); } },
    data.types.map((t) => h('option', { value: t.key, text: `${t.key} (${t.unit})`, selected: t.key === data.type })));
  const facts = h('table', { class: 'details', id: 'facts' },
    data.facts.map(([k, v]) => h('tr', {}, h('td', { text: k }), h('td', { class: 'mono', text: v }))));

  function setType(key) {
    const t = data.types.find((x) => x.key === key) || data.types[0];
    if (data.selves) compact.nodes.self = data.selves[t.key];
    compact.total = compact.nodes.self.reduce((a, b) => a + b, 0);
    compact.unit = t.unit;
    data.type = t.key;
  }

  function draw() { window.bpfTimes = panel.draw(compact); }

  app.replaceChildren(
    facts,
    h('div', { class: 'controls' }, h('label', {}, 'sample type ', typeSel), panel.search, panel.searchResult, panel.resetZoom),
    diff ? panel.legend : null,
    panel.graph, panel.details, panel.changes,
    h('div', { class: 'columns' }, h('div', {}, h('h3', { text: 'Top functions' }), panel.top)));
  setType(data.type);
  draw();
  window.bpfReport = { drawnMs: performance.now(), startMs: tParse, times: window.bpfTimes };
})();
