// The page of one profile (or a diff of two) written to a file: `record --format html`, `diff --html`,
// `view`. Data is in the #report-data script element (viewer/report.py); nothing is fetched.
// When drawn, window.bpfReport = {drawnMs} (time from navigation start, read by the bench and tests).
(function () {
  'use strict';
  const F = window.bpfflame;
  const app = document.getElementById('app');
  const tParse = performance.now();
  const data = JSON.parse(document.getElementById('report-data').textContent);

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'text') el.textContent = v;
      else el.setAttribute(k, v === true ? '' : v);
    }
    for (const kid of kids.flat()) if (kid !== null && kid !== undefined) el.append(kid);
    return el;
  }

  const compact = data.flamegraph;
  const typeSel = h('select', { id: 'type', onchange: () => { setType(typeSel.value); draw(); } },
    data.types.map((t) => h('option', { value: t.key, text: `${t.key} (${t.unit})`, selected: t.key === data.type })));
  const search = h('input', { id: 'search', placeholder: 'search functions', size: 24 });
  const searchResult = h('span', { id: 'search-result', class: 'muted' });
  const graph = h('div', { id: 'flamegraph' });
  const details = h('div', { id: 'details' });
  const top = h('table', { class: 'list', id: 'top' });
  const facts = h('table', { class: 'details', id: 'facts' },
    data.facts.map(([k, v]) => h('tr', {}, h('td', { text: k }), h('td', { class: 'mono', text: v }))));
  const diff = !!compact.nodes.base;
  // Frames under 0.001 % of the total are not drawn: 1.3 px even zoomed into a 1 % subtree, and on a
  // 10-minute machine-wide profile they are most of the nodes. The top table and search count them.
  const MIN_FRAME_FRACTION = 1e-5;
  let chart = null;

  function setType(key) {
    const t = data.types.find((x) => x.key === key) || data.types[0];
    if (data.selves) compact.nodes.self = data.selves[t.key];
    compact.total = compact.nodes.self.reduce((a, b) => a + b, 0);
    compact.unit = t.unit;
    data.type = t.key;
  }

  function drawGraph() {
    if (chart) chart.destroy();
    graph.replaceChildren();
    if (!compact.total) {
      graph.append(h('p', { class: 'muted', id: 'no-samples', text: 'No samples of this type.' }));
      chart = null;
      return;
    }
    const unit = compact.unit;
    chart = flamegraph()
      .width(Math.max(600, (graph.clientWidth || app.clientWidth) - 24))
      .cellHeight(18)
      .transitionDuration(0)
      .minFrameSize(1)
      .sort(true)
      .computeDelta(diff)
      .setSearchMatch((d, term) => F.matches(d.data.name, term))
      .setDetailsElement(details)
      .setDetailsHandler((d) => {
        details.textContent = d ? `${d.data.name}: ${F.formatValue(d.value, unit)} (${F.percent(d.value, compact.total)})` : '';
      })
      .setLabelHandler((d) => `${d.data.name} (${F.formatValue(d.value, unit)}, ${F.percent(d.value, compact.total)})`);
    if (diff) chart.setColorMapper(flamegraph.colorMapper.differentialColorMapper);
    chart.setSearchHandler(() => {});
    d3.select(graph).datum(F.toD3(compact, MIN_FRAME_FRACTION)).call(chart);
  }

  function drawTop() {
    const rows = F.topTable(compact).slice(0, 200);
    const unit = compact.unit;
    top.replaceChildren(h('thead', {}, h('tr', {}, ['function', 'self', 'self %', 'total', 'total %'].map((t, i) => h('th', { class: i ? 'num' : '', text: t })))),
      h('tbody', {}, rows.map((r) => h('tr', { 'data-self': r.self, 'data-total': r.total, onclick: () => { search.value = r.name; doSearch(); } },
        h('td', { class: 'fn', text: r.name }),
        h('td', { class: 'num', text: F.formatValue(r.self, unit) }), h('td', { class: 'num', text: F.percent(r.self, compact.total) }),
        h('td', { class: 'num', text: F.formatValue(r.total, unit) }), h('td', { class: 'num', text: F.percent(r.total, compact.total) })))));
  }

  function changesTable() {
    if (!data.changes) return null;
    const sign = (v) => `${v > 0 ? '+' : ''}${v.toFixed(2)}`;
    return h('div', {}, h('h3', { text: 'Largest changes of share (points; significant: Holm-adjusted two-proportion z-test)' }),
      h('table', { class: 'list', id: 'changes' },
        h('thead', {}, h('tr', {}, ['function', 'measure', 'base %', 'new %', 'change', 'p (adjusted)', ''].map((t, i) => h('th', { class: i > 1 ? 'num' : '', text: t })))),
        h('tbody', {}, data.changes.map((c) => h('tr', { class: c.significant ? 'significant' : 'muted', 'data-points': c.points },
          h('td', { class: 'fn', text: c.function }), h('td', { text: c.measure }),
          h('td', { class: 'num', text: c.base.toFixed(2) }), h('td', { class: 'num', text: c.new.toFixed(2) }),
          h('td', { class: 'num', text: sign(c.points) }),
          h('td', { class: 'num', text: c.p_adj === null ? 'untested' : String(c.p_adj) }),
          h('td', { text: c.significant ? 'significant' : '' }))))));
  }

  function doSearch() {
    const term = search.value.trim();
    if (chart) { if (term) chart.search(term); else chart.clear(); }
    if (!term) { searchResult.textContent = ''; return; }
    const r = F.searchSum(compact, term);
    searchResult.textContent = `${r.count} frames of ${r.functions} functions match: ${F.formatValue(r.sum, compact.unit)} (${F.percent(r.sum, r.total)})`;
  }
  search.addEventListener('input', doSearch);

  function draw() {
    const t0 = performance.now();
    drawGraph();
    const t1 = performance.now();
    drawTop();
    const t2 = performance.now();
    doSearch();
    window.bpfTimes = { graph: t1 - t0, top: t2 - t1 };
  }

  app.replaceChildren(
    facts,
    h('div', { class: 'controls' }, h('label', {}, 'sample type ', typeSel), search, searchResult,
      h('button', { type: 'button', id: 'reset-zoom', text: 'Reset zoom', onclick: () => chart && chart.resetZoom() })),
    diff ? h('p', { id: 'diff-legend', class: 'muted', text: 'red: more than the base (scaled to this total), blue: less' }) : null,
    graph, details, changesTable(),
    h('div', { class: 'columns' }, h('div', {}, h('h3', { text: 'Top functions' }), top)));
  setType(data.type);
  draw();
  window.bpfReport = { drawnMs: performance.now(), startMs: tParse, times: window.bpfTimes };
})();
