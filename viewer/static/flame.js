// Pure functions over the compact flame graph JSON of viewer/flamegraph.py:
//   {names: [...], nodes: {name: [...], parent: [...], self: [...], base?: [...]}, total, unit}
// No DOM here: the browser page and node's test runner (viewer/js_tests) load the same file.
(function (root, factory) {
  if (typeof module === 'object' && module.exports) module.exports = factory();
  else root.bpfflame = factory();
})(typeof self !== 'undefined' ? self : this, function () {
  'use strict';

  // Children lists and subtree totals from the parent/self columns (parents come before children).
  function index(compact) {
    const n = compact.nodes.name.length;
    const children = Array.from({ length: n }, () => []);
    const total = compact.nodes.self.slice();
    const base = compact.nodes.base ? compact.nodes.base.slice() : null;
    for (let i = 1; i < n; i++) children[compact.nodes.parent[i]].push(i); // push, not unshift: O(n)
    for (let i = n - 1; i > 0; i--) {
      const p = compact.nodes.parent[i];
      total[p] += total[i];
      if (base) base[p] += base[i];
    }
    return { n, children, total, base };
  }

  // The nested {name, value, children[, d]} tree d3-flame-graph draws: value is the subtree total,
  // d the node's own change against the baseline (d3-flame-graph sums it with computeDelta).
  // minFraction > 0 leaves out subtrees smaller than that share of the root (a large profile's
  // long tail, too thin to see even zoomed in): their value stays in their parent's.
  function toD3(compact, minFraction) {
    const idx = index(compact);
    const min = Math.max(1e-300, (minFraction || 0) * idx.total[0]);
    const build = (i) => {
      const node = {
        name: compact.names[compact.nodes.name[i]],
        value: idx.total[i],
        children: idx.children[i].filter((c) => idx.total[c] >= min).map(build),
      };
      if (compact.nodes.base) node.d = compact.nodes.self[i] - compact.nodes.base[i];
      return node;
    };
    return build(0);
  }

  // Per function: self (value where it is the leaf) and total (value of stacks it is on,
  // counted once per stack even when it recurses). Sorted by self, then total, then name.
  function topTable(compact) {
    const idx = index(compact);
    const rows = new Map();
    const row = (name) => {
      let r = rows.get(name);
      if (!r) rows.set(name, (r = { name, self: 0, total: 0 }));
      return r;
    };
    // Depth-first without recursion (stacks can be deep) and without copying the path: onPath counts
    // how often each name is on the current path; a node adds to total only where its name is not above it.
    const onPath = new Map();
    const stack = [[0, false]];
    while (stack.length) {
      const [i, leaving] = stack.pop();
      const name = compact.names[compact.nodes.name[i]];
      if (leaving) {
        if (i !== 0) onPath.set(name, onPath.get(name) - 1);
        continue;
      }
      if (i !== 0) {
        const r = row(name);
        r.self += compact.nodes.self[i];
        const seen = onPath.get(name) || 0;
        if (!seen) r.total += idx.total[i];
        onPath.set(name, seen + 1);
      }
      stack.push([i, true]);
      const kids = idx.children[i];
      for (let k = kids.length - 1; k >= 0; k--) if (idx.total[kids[k]] > 0) stack.push([kids[k], false]);
    }
    return Array.from(rows.values())
      .filter((r) => r.total > 0)
      .sort((a, b) => b.self - a.self || b.total - a.total || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  // Case-insensitive substring match (not a RegExp: user input like "foo(" must not throw).
  function matches(name, term) {
    return !!term && name.toLowerCase().includes(term.toLowerCase());
  }

  // Nodes whose name matches, and the value they cover: a match under a matching ancestor
  // is already counted in it.
  function searchSum(compact, term) {
    const idx = index(compact);
    let sum = 0;
    let count = 0;
    const names = new Set();
    const walk = (i, covered) => {
      const name = compact.names[compact.nodes.name[i]];
      const hit = i !== 0 && matches(name, term);
      if (hit) {
        count += 1;
        names.add(name);
        if (!covered) sum += idx.total[i];
      }
      for (const c of idx.children[i]) walk(c, covered || hit);
    };
    if (term) walk(0, false);
    return { count, functions: names.size, sum, total: idx.total[0] };
  }

  const UNITS = {
    nanoseconds: [[1e9, 's'], [1e6, 'ms'], [1e3, 'µs'], [1, 'ns']],
    bytes: [[1 << 30, 'GiB'], [1 << 20, 'MiB'], [1 << 10, 'KiB'], [1, 'B']],
  };

  // "1.23 s", "4.5 MiB", "1,234": a value in its unit, short.
  function formatValue(v, unit) {
    const scale = UNITS[unit];
    if (!scale) return Math.round(v).toLocaleString('en-US');
    for (const [div, name] of scale) {
      if (Math.abs(v) >= div) return `${+(v / div).toFixed(2)} ${name}`;
    }
    return `0 ${scale[scale.length - 1][1]}`;
  }

  function percent(v, total) {
    return total ? `${((100 * v) / total).toFixed(1)}%` : '0%';
  }

  return { index, toD3, topTable, matches, searchSum, formatValue, percent };
});
