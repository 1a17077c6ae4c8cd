// What the pages share (serve's app.js, the file pages' report.js): element helpers and the flame panel
// (search, flame graph, details line, table of a diff's changes, top table). Text always goes in through
// textContent: function and span names are user data.
(function () {
  'use strict';
  const F = window.bpfflame;

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

  const svgNS = 'http://www.w3.org/2000/svg';
  function s(tag, attrs) {
    const el = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    return el;
  }

  const TOP_ROWS = 200;

  // The flame panel. opts.minFraction: frames under that share of the total are not drawn (the top
  // table and search still count them); opts.baseLabel / newLabel: what a diff's two sides are called.
  // Its parts are placed by the page; draw(compact) fills them from a compact flame graph whose
  // optional `changes` is the ranking of exporters/diff.py.
  function flamePanel(opts) {
    const o = { minFraction: 0, baseLabel: 'the baseline', newLabel: 'this', ...opts };
    const search = h('input', { id: 'search', placeholder: 'search functions', size: 24 });
    const searchResult = h('span', { id: 'search-result', class: 'muted' });
    const graph = h('div', { id: 'flamegraph' });
    const details = h('div', { id: 'details' });
    const top = h('table', { class: 'list', id: 'top' });
    const legend = h('p', { id: 'diff-legend', class: 'muted', hidden: true });
    const changesTable = h('table', { class: 'list', id: 'changes' });
    const changes = h('div', { id: 'changes-box', hidden: true },
      h('h3', { text: 'Largest changes of share (points; significant: Holm-adjusted two-proportion z-test)' }), changesTable);
    let chart = null;
    let compact = null;
    const resetZoom = h('button', { type: 'button', id: 'reset-zoom', text: 'Reset zoom', onclick: () => chart && chart.resetZoom() });

    function drawGraph() {
      if (chart) chart.destroy();
      graph.replaceChildren();
      chart = null;
      if (!compact.total) {
        graph.append(h('p', { class: 'muted', id: 'no-samples', text: 'No samples of this type here.' }));
        return;
      }
      const unit = compact.unit;
      const isDiff = !!compact.nodes.base;
      chart = flamegraph()
        .width(Math.max(600, (graph.clientWidth || document.body.clientWidth) - 24)) // room for a scrollbar
        .cellHeight(18)
        .transitionDuration(0)
        .minFrameSize(1)
        .sort(true)
        .computeDelta(isDiff)
        .setSearchMatch((d, term) => F.matches(d.data.name, term))
        .setDetailsElement(details)
        .setDetailsHandler((d) => {
          details.textContent = d ? `${d.data.name}: ${F.formatValue(d.value, unit)} (${F.percent(d.value, compact.total)})` : '';
        })
        .setLabelHandler((d) => `${d.data.name} (${F.formatValue(d.value, unit)}, ${F.percent(d.value, compact.total)})`);
      if (isDiff) chart.setColorMapper(flamegraph.colorMapper.differentialColorMapper);
      chart.setSearchHandler(() => {}); // the sum is shown by doSearch, from flame.js
      d3.select(graph).datum(F.toD3(compact, o.minFraction)).call(chart);
    }

    function drawTop() {
      const rows = F.topTable(compact).slice(0, TOP_ROWS);
      const unit = compact.unit;
      top.replaceChildren(h('thead', {}, h('tr', {}, ['function', 'self', 'self %', 'total', 'total %'].map((t, i) => h('th', { class: i ? 'num' : '', text: t })))),
        h('tbody', {}, rows.map((r) => h('tr', { 'data-self': r.self, 'data-total': r.total, onclick: () => { search.value = r.name; doSearch(); } },
          h('td', { class: 'fn', text: r.name }),
          h('td', { class: 'num', text: F.formatValue(r.self, unit) }), h('td', { class: 'num', text: F.percent(r.self, compact.total) }),
          h('td', { class: 'num', text: F.formatValue(r.total, unit) }), h('td', { class: 'num', text: F.percent(r.total, compact.total) })))));
    }

    function drawChanges() {
      const rows = compact.changes || [];
      changes.hidden = !rows.length;
      const sign = (v) => `${v > 0 ? '+' : ''}${v.toFixed(2)}`;
      changesTable.replaceChildren(
        h('thead', {}, h('tr', {}, ['function', 'measure', 'base %', `${o.newLabel} %`, 'change', 'p (adjusted)', ''].map((t, i) => h('th', { class: i > 1 && i < 6 ? 'num' : '', text: t })))),
        h('tbody', {}, rows.map((c) => h('tr', { class: c.significant ? 'significant' : 'muted', 'data-points': c.points, 'data-measure': c.measure },
          h('td', { class: 'fn', text: c.function }), h('td', { text: c.measure }),
          h('td', { class: 'num', text: c.base.toFixed(2) }), h('td', { class: 'num', text: c.new.toFixed(2) }),
          h('td', { class: 'num', text: sign(c.points) }),
          h('td', { class: 'num', text: c.p_adj === null ? 'untested' : String(c.p_adj) }),
          h('td', { text: c.significant ? 'significant' : '' })))));
    }

    function doSearch() {
      const term = search.value.trim();
      if (chart) { if (term) chart.search(term); else chart.clear(); }
      if (!term || !compact) { searchResult.textContent = ''; return; }
      const r = F.searchSum(compact, term);
      searchResult.textContent = `${r.count} frames of ${r.functions} functions match: ${F.formatValue(r.sum, compact.unit)} (${F.percent(r.sum, r.total)})`;
    }
    search.addEventListener('input', doSearch);

    // Draws everything; returns the milliseconds the graph and the top table took.
    function draw(c) {
      compact = c;
      legend.hidden = !compact.nodes.base;
      legend.textContent = compact.nodes.base ? `red: more than ${o.baseLabel} (scaled to this total), blue: less, orange: new` : '';
      const t0 = performance.now();
      drawGraph();
      const t1 = performance.now();
      drawTop();
      const t2 = performance.now();
      drawChanges();
      doSearch();
      return { graph: t1 - t0, top: t2 - t1 };
    }

    return { search, searchResult, resetZoom, graph, details, top, legend, changes, draw };
  }

  window.bpfdom = { h, s, flamePanel };
})();
