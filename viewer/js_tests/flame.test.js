// node --test viewer/js_tests: the pure half of the page (viewer/static/flame.js).
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const f = require('../static/flame.js');

// all -> main -> {work -> spin (self 6), idle (self 2)}, main self 1; spin again under spin (recursion).
const compact = {
  names: ['all', 'main', 'work', 'spin', 'idle'],
  nodes: {
    name: [0, 1, 2, 3, 4, 3],
    parent: [-1, 0, 1, 2, 1, 3],
    self: [0, 1, 0, 6, 2, 3],
  },
  total: 12,
  unit: 'nanoseconds',
};

test('toD3 nests children with subtree totals', () => {
  const t = f.toD3(compact);
  assert.equal(t.name, 'all');
  assert.equal(t.value, 12);
  const main = t.children[0];
  assert.equal(main.value, 12);
  assert.deepEqual(main.children.map((c) => [c.name, c.value]), [['work', 9], ['idle', 2]]);
  assert.equal(main.children[0].children[0].children[0].value, 3);
});

test('toD3 drops empty subtrees and carries self deltas for a diff', () => {
  const withBase = { ...compact, nodes: { ...compact.nodes, self: [0, 1, 0, 6, 0, 3], base: [0, 1, 0, 2, 4, 3] } };
  const t = f.toD3(withBase);
  assert.deepEqual(t.children[0].children.map((c) => c.name), ['work']);
  assert.equal(t.children[0].children[0].children[0].d, 4);
});

test('toD3 with minFraction leaves out thin subtrees, their value kept in the parent', () => {
  const t = f.toD3(compact, 0.2); // 2.4 of 12: idle (2) goes, work (9) and its spin (9) stay, the inner spin (3) too
  const main = t.children[0];
  assert.equal(main.value, 12);
  assert.deepEqual(main.children.map((c) => c.name), ['work']);
  assert.equal(main.children[0].children[0].children[0].value, 3);
});

test('topTable: self and total, recursion counted once', () => {
  const rows = f.topTable(compact);
  const by = Object.fromEntries(rows.map((r) => [r.name, r]));
  assert.deepEqual(rows.map((r) => r.name), ['spin', 'idle', 'main', 'work']);
  assert.deepEqual([by.spin.self, by.spin.total], [9, 9]);
  assert.deepEqual([by.main.self, by.main.total], [1, 12]);
  assert.deepEqual([by.work.self, by.work.total], [0, 9]);
});

test('searchSum: matches counted, nested matches not double-summed, no RegExp', () => {
  assert.deepEqual(f.searchSum(compact, 'SPIN'), { count: 2, functions: 1, sum: 9, total: 12 });
  assert.deepEqual(f.searchSum(compact, 'i'), { count: 4, functions: 3, sum: 12, total: 12 });
  assert.deepEqual(f.searchSum(compact, 'spin('), { count: 0, functions: 0, sum: 0, total: 12 });
  assert.equal(f.searchSum(compact, '').sum, 0);
});

test('formatValue picks a unit', () => {
  assert.equal(f.formatValue(1_500_000, 'nanoseconds'), '1.5 ms');
  assert.equal(f.formatValue(3 * 1024 * 1024, 'bytes'), '3 MiB');
  assert.equal(f.formatValue(1234, 'count'), '1,234');
  assert.equal(f.formatValue(0, 'nanoseconds'), '0 ns');
  assert.equal(f.percent(1, 4), '25.0%');
});
