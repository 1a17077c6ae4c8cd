// The page of `bpfprof serve` and `bpfprof view`: routes /, /trace/<id>, /trace/<id>/span/<id> and
// /profile/<id> on the client, reads the JSON API, draws flame graphs with d3-flame-graph (dom.js's
// panel). Pure data work is in flame.js (tested by node).
(function () {
  'use strict';
  const F = window.bpfflame;
  const app = document.getElementById('app');

  const { h, s, flamePanel } = window.bpfdom;
  async function api(path) {
    const r = await fetch(path);
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  }
  function ms(v) { return F.formatValue(v * 1e6, 'nanoseconds'); }
  function when(unixMs) { return new Date(unixMs).toISOString().replace('T', ' ').replace('Z', ''); }
  function fail(e) { app.replaceChildren(h('p', { class: 'error', id: 'error', text: String(e.message || e) })); }

  // --- routing --------------------------------------------------------------------------------------
  function go(path) { history.pushState(null, '', path); route(); }
  function link(path, text, cls) {
    return h('a', { href: path, class: cls, text, onclick: (e) => { if (!e.ctrlKey && !e.metaKey) { e.preventDefault(); go(path); } } });
  }
  function route() {
    const p = location.pathname;
    let m;
    if ((m = p.match(/^\/trace\/([0-9a-fA-F]{32})\/span\/([0-9a-fA-F]{16})\/?$/))) return spanPage(m[1], m[2]).catch(fail);
    if ((m = p.match(/^\/trace\/([0-9a-fA-F]{32})\/?$/))) return tracePage(m[1]).catch(fail);
    if ((m = p.match(/^\/profile\/(\d+)\/?$/))) return profilePage(m[1]).catch(fail);
    return listPage().catch(fail);
  }
  window.addEventListener('popstate', route);
  document.getElementById('trace-search').addEventListener('submit', (e) => {
    e.preventDefault();
    const id = document.getElementById('trace-id').value.trim().toLowerCase();
    if (/^[0-9a-f]{32}$/.test(id)) go(`/trace/${id}`);
    else fail(new Error('a trace id is 32 hex digits'));
  });

  // --- spans list: slowest first, with filters ----------------------------------------------------
  async function listPage() {
    const q = new URLSearchParams(location.search);
    const [data, loaded] = await Promise.all([api(`/api/spans?${q}`), api('/api/profiles')]);
    const field = (name, label, attrs) => h('label', {}, label, h('input', { name, value: q.get(name) || '', ...attrs }));
    const service = h('select', { name: 'service' }, h('option', { value: '', text: 'all services' }),
      data.services.map((sv) => h('option', { value: sv, text: sv, selected: sv === q.get('service') })));
    const toMs = (v) => (v ? String(Date.parse(v)) : '');
    const fromMs = (v) => (v ? new Date(+v).toISOString().slice(0, 16) : '');
    const since = h('input', { type: 'datetime-local', value: fromMs(q.get('since_ms')) });
    const until = h('input', { type: 'datetime-local', value: fromMs(q.get('until_ms')) });
    const form = h('form', { class: 'filters', id: 'filters', onsubmit: (e) => {
      e.preventDefault();
      const p = new URLSearchParams();
      for (const [k, v] of new FormData(form)) if (v) p.set(k, v);
      if (since.value) p.set('since_ms', toMs(since.value));
      if (until.value) p.set('until_ms', toMs(until.value));
      go(`/?${p}`);
    } },
      h('label', {}, 'service', service),
      field('name', 'span name', { id: 'f-name', placeholder: 'contains' }),
      field('min_ms', 'min duration (ms)', { id: 'f-min', type: 'number', step: 'any', min: 0 }),
      field('max_ms', 'max duration (ms)', { type: 'number', step: 'any', min: 0 }),
      h('label', {}, 'since', since), h('label', {}, 'until', until),
      field('trace_id', 'trace id', { size: 34 }),
      h('button', { type: 'submit', text: 'Filter' }));
    const longest = Math.max(1e-9, ...data.spans.map((sp) => sp.duration_ms));
    const rows = data.spans.map((sp) => {
      const path = `/trace/${sp.trace_id}/span/${sp.span_id}`;
      return h('tr', { class: 'clickable span-row', 'data-span-id': sp.span_id, 'data-trace-id': sp.trace_id, onclick: () => go(path) },
        h('td', { class: 'num', text: ms(sp.duration_ms) }),
        h('td', {}, h('span', { class: 'bar', style: `width:${Math.max(1, (120 * sp.duration_ms) / longest)}px` })),
        h('td', { text: sp.service }),
        h('td', {}, link(path, sp.name, 'span-link')),
        h('td', { class: 'mono' }, link(`/trace/${sp.trace_id}`, sp.trace_id)),
        h('td', { text: when(sp.start_unix_ms) }),
        h('td', { class: 'num', text: sp.tid ?? '' }));
    });
    const spans = [h('h2', { text: 'Spans, slowest first' }), form,
      rows.length ? h('table', { class: 'list', id: 'spans' },
        h('thead', {}, h('tr', {}, ['duration', '', 'service', 'span', 'trace', 'start (UTC)', 'thread'].map((t) => h('th', { text: t })))),
        h('tbody', {}, rows))
        : h('p', { class: 'muted', id: 'empty', text: 'No spans yet: point an OTLP trace exporter at this server.' })];
    // `bpfprof view` has profiles from files and no spans: only the profiles then.
    const profiles = loaded.profiles.length ? profileList(loaded.profiles) : [];
    app.replaceChildren(...profiles, ...(profiles.length && !rows.length && !q.toString() ? [] : spans));
  }

  function profileList(profiles) {
    const rows = profiles.map((p) => {
      const path = `/profile/${p.id}`;
      return h('tr', { class: 'clickable profile-row', 'data-profile-id': p.id, onclick: () => go(path) },
        h('td', {}, link(path, p.source, 'profile-link')),
        h('td', { text: p.kind }),
        h('td', { text: p.types.map((t) => t.sample_type).join(', ') }),
        h('td', { text: when(p.start_unix_ms) }),
        h('td', { class: 'num', text: ms(p.duration_ms) }),
        h('td', { class: 'num', text: p.processes }));
    });
    return [h('h2', { text: 'Profiles from files' }), h('table', { class: 'list', id: 'profiles' },
      h('thead', {}, h('tr', {}, ['file', 'kind', 'sample types', 'start (UTC)', 'duration', 'processes'].map((t) => h('th', { text: t })))),
      h('tbody', {}, rows))];
  }

  // --- one trace: its spans as a waterfall -------------------------------------------------------
  async function tracePage(traceId) {
    const data = await api(`/api/trace/${traceId}`);
    const t0 = Math.min(...data.spans.map((sp) => sp.start_unix_ms));
    const t1 = Math.max(...data.spans.map((sp) => sp.start_unix_ms + sp.duration_ms));
    const depth = {};
    const byId = Object.fromEntries(data.spans.map((sp) => [sp.span_id, sp]));
    const depthOf = (sp, seen = 0) => (byId[sp.parent_span_id] && seen < 64 ? 1 + depthOf(byId[sp.parent_span_id], seen + 1) : 0);
    for (const sp of data.spans) depth[sp.span_id] = depthOf(sp);
    const rows = data.spans.map((sp) => {
      const path = `/trace/${traceId}/span/${sp.span_id}`;
      const left = (100 * (sp.start_unix_ms - t0)) / Math.max(1e-9, t1 - t0);
      const width = (100 * sp.duration_ms) / Math.max(1e-9, t1 - t0);
      return h('tr', { class: 'clickable span-row', 'data-span-id': sp.span_id, onclick: () => go(path) },
        h('td', { style: `padding-left:${0.6 + depth[sp.span_id] * 1.2}em` }, link(path, sp.name, 'span-link')),
        h('td', { text: sp.service }),
        h('td', { class: 'num', text: ms(sp.duration_ms) }),
        h('td', { class: 'bar-cell' }, h('div', { class: 'wbar', style: `left:${left}%;width:${width}%` })));
    });
    app.replaceChildren(h('h2', {}, 'Trace ', h('span', { class: 'mono', text: traceId })),
      h('table', { class: 'list waterfall', id: 'trace' }, h('tbody', {}, rows)));
  }

  // --- one span: details, method, then the graph view -------------------------------------------
  async function spanPage(traceId, spanId) {
    const base = `/api/trace/${traceId}/span/${spanId}`;
    const data = await api(`${base}/flamegraph`);
    const sp = data.span;
    const detail = (k, v) => h('tr', {}, h('td', { text: k }), h('td', { class: 'mono', text: v ?? '' }));
    const attrs = Object.entries(sp.attributes).map(([k, v]) => detail(k, typeof v === 'string' ? v : JSON.stringify(v)));
    const details = h('table', { class: 'details', id: 'span-details' },
      detail('service', sp.service), detail('trace id', sp.trace_id), detail('span id', sp.span_id),
      detail('parent span id', sp.parent_span_id || '(root)'), detail('start (UTC)', when(sp.start_unix_ms)),
      detail('duration', ms(sp.duration_ms)), detail('process', sp.pid), detail('thread', sp.tid ?? `(${sp.thread_attr ?? 'no thread.id'})`),
      detail('status', sp.status_code ? `${sp.status_code} ${sp.status_message}` : 'unset/ok'), attrs);
    const title = h('h2', {}, link(`/trace/${traceId}`, 'trace', 'muted'), ' / ', h('span', { id: 'span-name', text: sp.name }), ' ',
      h('span', { class: 'muted', text: ms(sp.duration_ms) }));
    graphView(base, data, [title, details], [
      { value: 'span', text: 'this span' },
      { value: 'name', text: 'diff vs other spans of this name', query: { baseline: 'name' } },
      { value: 'range', text: 'diff vs another time range', query: { baseline: 'range' }, range: true }]);
  }

  // --- one profile loaded from a file (`bpfprof view`) ---------------------------------------------
  async function profilePage(id) {
    const base = `/api/profile/${id}`;
    const [data, loaded] = await Promise.all([api(`${base}/flamegraph`), api('/api/profiles')]);
    const p = data.profile;
    const detail = (k, v) => h('tr', {}, h('td', { text: k }), h('td', { class: 'mono', text: v ?? '' }));
    const details = h('table', { class: 'details', id: 'profile-details' },
      detail('file', p.source), detail('kind', p.kind), detail('start (UTC)', when(p.start_unix_ms)),
      detail('duration', ms(p.duration_ms)), detail('processes', p.processes));
    const title = h('h2', {}, link('/', 'profiles', 'muted'), ' / ', h('span', { id: 'profile-name', text: p.source }));
    const others = loaded.profiles.filter((o) => o.id !== p.id && o.kind === p.kind)
      .map((o) => ({ value: `base-${o.id}`, text: `diff vs ${o.source}`, query: { base: o.id } }));
    graphView(base, data, [title, details], [{ value: 'profile', text: 'this profile' }, ...others]);
  }

  // The method line, profile type, view mode (the graph or a diff), time range, search, flame panel
  // and pprof download of a span or a profile: `base` is its API prefix, `data` its first flamegraph.
  function graphView(base, data, head, modes) {
    const state = { type: data.type, from: null, to: null, mode: modes[0], baseFrom: null, baseTo: null };
    const panel = flamePanel({ minFraction: 1e-5 }); // as the file pages: thin frames are not drawn
    const method = h('div', { id: 'method' });
    const typeSel = h('select', { id: 'type', onchange: () => { state.type = typeSel.value; refresh(); } });
    const fromIn = h('input', { id: 'range-from', type: 'number', step: 'any', min: 0, size: 8 });
    const toIn = h('input', { id: 'range-to', type: 'number', step: 'any', min: 0, size: 8 });
    const applyRange = () => {
      state.from = fromIn.value === '' ? null : +fromIn.value;
      state.to = toIn.value === '' ? null : +toIn.value;
      refresh();
    };
    const mode = h('select', { id: 'mode', onchange: () => {
      state.mode = modes.find((m) => m.value === mode.value);
      baseBox.hidden = !state.mode.range;
      refresh();
    } }, modes.map((m) => h('option', { value: m.value, text: m.text })));
    const baseFrom = h('input', { id: 'base-from', type: 'number', step: 'any', min: 0, size: 8 });
    const baseTo = h('input', { id: 'base-to', type: 'number', step: 'any', min: 0, size: 8 });
    const baseBox = h('span', { hidden: true }, 'baseline ms ', baseFrom, '–', baseTo,
      h('button', { type: 'button', text: 'Compare', onclick: () => { state.baseFrom = +baseFrom.value || 0; state.baseTo = baseTo.value === '' ? null : +baseTo.value; refresh(); } }));
    const pprof = h('a', { id: 'pprof', text: 'download pprof' });
    const timeline = s('svg', { id: 'timeline', width: 600, height: 40 });

    app.replaceChildren(...head, method,
      h('div', { class: 'controls' }, h('label', {}, 'profile ', typeSel), modes.length > 1 ? h('label', {}, 'view ', mode) : null, baseBox, pprof),
      h('div', { class: 'controls' }, timeline, h('span', {}, 'range ms ', fromIn, '–', toIn),
        h('button', { type: 'button', id: 'range-apply', text: 'Apply', onclick: applyRange }),
        h('button', { type: 'button', id: 'range-reset', text: 'Whole', onclick: () => { fromIn.value = toIn.value = ''; applyRange(); } })),
      h('div', { class: 'controls' }, panel.search, panel.searchResult, panel.resetZoom),
      panel.legend, panel.graph, panel.details, panel.changes,
      h('div', { class: 'columns' }, h('div', {}, h('h3', { text: 'Top functions' }), panel.top)));

    function query(extra) {
      const p = new URLSearchParams();
      if (state.type) p.set('type', state.type);
      if (state.from !== null) p.set('from_ms', state.from);
      if (state.to !== null) p.set('to_ms', state.to);
      for (const [k, v] of Object.entries(extra || {})) if (v !== null && v !== undefined) p.set(k, v);
      return p;
    }

    async function refresh() {
      try {
        if (!state.mode.query) data = await api(`${base}/flamegraph?${query()}`);
        else data = await api(`${base}/diff?${query({ ...state.mode.query, base_from_ms: state.baseFrom, base_to_ms: state.baseTo })}`);
      } catch (e) {
        method.className = 'm-none';
        method.textContent = String(e.message || e);
        return;
      }
      draw();
    }

    function draw() {
      state.type = data.type;
      method.className = `m-${data.method}`;
      method.replaceChildren(h('b', { text: `method: ${data.method}` }), ' — ', data.reason,
        data.baseline ? ` · baseline: ${data.baseline}` : '');
      method.dataset.method = data.method;
      method.dataset.type = data.type;
      const types = data.types || (data.profile && data.profile.types);
      if (types) {
        typeSel.replaceChildren(...types.map((t) => h('option', { value: t.key, text: t.key, selected: t.key === data.type })));
      }
      pprof.href = `${base}/pprof?${query()}`;
      if (data.timeline) drawTimeline(data.timeline, data.window_ms);
      window.bpfTimes = panel.draw(data.flamegraph);
      window.bpfDrawn = { type: data.type, mode: state.mode.value, total: data.flamegraph.total, ms: performance.now() };
    }

    // The strip of value over time; drag to select a range.
    function drawTimeline(tl, windowMs) {
      const W = 600, H = 40;
      const max = Math.max(1, ...tl.values);
      const bw = W / tl.values.length;
      const t0 = windowMs[0];
      timeline.replaceChildren(...tl.values.map((v, i) => s('rect', { x: i * bw, width: Math.max(0.5, bw - 1), y: H - (H * v) / max, height: (H * v) / max, fill: '#5c8ee6' })));
      const span = tl.bucket_ms * tl.values.length;
      const toMsAt = (x) => t0 + (Math.min(W, Math.max(0, x)) / W) * span;
      let startX = null;
      const sel = s('rect', { class: 'sel', y: 0, height: H, width: 0 });
      timeline.append(sel);
      timeline.onmousedown = (e) => { startX = e.offsetX; sel.setAttribute('x', startX); sel.setAttribute('width', 0); };
      timeline.onmousemove = (e) => {
        if (startX === null) return;
        sel.setAttribute('x', Math.min(startX, e.offsetX));
        sel.setAttribute('width', Math.abs(e.offsetX - startX));
      };
      timeline.onmouseup = (e) => {
        if (startX === null) return;
        const a = toMsAt(Math.min(startX, e.offsetX)), b = toMsAt(Math.max(startX, e.offsetX));
        startX = null;
        if (b - a < tl.bucket_ms / 2) return;
        fromIn.value = a.toFixed(3);
        toIn.value = b.toFixed(3);
        applyRange();
      };
    }

    draw();
  }

  route();
})();
