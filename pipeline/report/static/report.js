'use strict';
// The reviewer's workbench: sorting and filters of the cluster lists, crops of source
// images, and the groups being picked (kept in localStorage, per report and model, so
// every page of the report shares them), exported as a groups.yaml for 'pipeline groups'.
(function () {
  var body = document.body;
  var KEY = 'pipeline-review:' + (body.dataset.report || 'report');
  var all = function (sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); };

  // ------------------------------------------------------------------ member cards
  // Cards are laid out here from the page's JSON (text set as text, never as HTML).
  var STATUS_LABELS = {
    'kept': 'kept', 'removed:duplicate_image': 'duplicate image',
    'removed:low_similarity': 'low similarity', 'removed:small_cluster': 'small cluster'
  };
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  function parseBox(text) {
    try {
      var b = JSON.parse(text);
      if (!Array.isArray(b) || b.length !== 4 || !b.every(isFinite)) { return null; }
      var box = [Math.floor(Math.min(b[0], b[2])), Math.floor(Math.min(b[1], b[3])),
        Math.ceil(Math.max(b[0], b[2])), Math.ceil(Math.max(b[1], b[3]))];
      return box[2] > box[0] && box[3] > box[1] ? box : null;
    } catch (e) { return null; }
  }
  function fixed(v, n) { return (v === null || v === undefined || isNaN(v)) ? '–' : Number(v).toFixed(n); }
  function card(m) {
    var kind = m.k ? 'kept' : 'removed';
    var fig = el('figure', 'card ' + kind);
    fig.dataset.object = String(m.id);
    var pic = el('div', 'pic');
    var alt = m.tag + ', object ' + m.id;
    var box = parseBox(m.b);
    if (m.t) {
      var img = el('img');
      img.loading = 'lazy';
      img.width = m.t[1];
      img.height = m.t[2];
      img.alt = alt;
      img.src = '../thumbs/' + m.t[0];
      pic.appendChild(img);
    } else if (m.src && box) {
      var crop = el('img', 'src-crop');
      crop.loading = 'lazy';
      crop.alt = alt;
      crop.dataset.box = box.join(' ');
      crop.src = m.src;
      pic.appendChild(crop);
    } else {
      var meta = el('span', 'meta-card');
      meta.title = 'no image: metadata only';
      meta.appendChild(el('span', 'meta-tag', m.tag));
      meta.appendChild(el('span', '', box ? (box[2] - box[0]) + '×' + (box[3] - box[1]) + ' px' : 'no box'));
      pic.appendChild(meta);
    }
    fig.appendChild(pic);
    var cap = el('figcaption');
    var first = el('div');
    first.appendChild(el('b', '', 'sim ' + fixed(m.sim, 3)));
    first.appendChild(document.createTextNode(' · dist ' + fixed(m.d, 3)));
    cap.appendChild(first);
    var second = el('div');
    var status = el('span', 'status ' + kind, STATUS_LABELS[m.s] || m.s);
    status.title = m.s;
    second.appendChild(status);
    second.appendChild(document.createTextNode(' · ' + m.tag + ' ' + fixed(m.sc, 2)));
    cap.appendChild(second);
    var who = el('div', 'muted', m.u + ' #' + m.ix);
    who.title = m.u + '/' + m.im + ' idx ' + m.ix;
    cap.appendChild(who);
    cap.appendChild(el('div', 'muted', 'object ' + m.id));
    if (m.x) {
      var label = el('label', 'excl');
      var box2 = el('input', 'exclude');
      box2.type = 'checkbox';
      box2.dataset.object = String(m.id);
      box2.dataset.cluster = String(m.c);
      label.appendChild(box2);
      label.appendChild(document.createTextNode(' exclude'));
      cap.appendChild(label);
    }
    fig.appendChild(cap);
    return fig;
  }
  var data = document.getElementById('members-data');
  if (data) {
    var grids = JSON.parse(data.textContent);
    Object.keys(grids).forEach(function (id) {
      var target = document.getElementById(id);
      if (!target) { return; }
      var frag = document.createDocumentFragment();
      grids[id].forEach(function (m) { frag.appendChild(card(m)); });
      target.appendChild(frag);
    });
  }

  // ------------------------------------------------------------------ state
  function fresh() { return { version: 1, groups: [], active: 0, excluded: {} }; }
  function load() {
    try {
      var s = JSON.parse(window.localStorage.getItem(KEY));
      if (s && Array.isArray(s.groups) && s.excluded) { return s; }
    } catch (e) { /* no storage or a damaged entry: start afresh */ }
    return fresh();
  }
  var state = load();
  function save() {
    try { window.localStorage.setItem(KEY, JSON.stringify(state)); } catch (e) { message('not saved: ' + e); }
    refresh();
  }
  function uniqueName(base) {
    var names = state.groups.map(function (g) { return g.name; });
    if (names.indexOf(base) < 0) { return base; }
    for (var i = 2; ; i += 1) { if (names.indexOf(base + ' ' + i) < 0) { return base + ' ' + i; } }
  }
  function activeGroup() {
    if (!state.groups.length) {
      state.groups.push({ name: uniqueName('group 1'), clusters: {} });
      state.active = 0;
    }
    if (state.active < 0 || state.active >= state.groups.length) { state.active = 0; }
    return state.groups[state.active];
  }
  function groupOf(cluster) {
    for (var i = 0; i < state.groups.length; i += 1) {
      if (Object.prototype.hasOwnProperty.call(state.groups[i].clusters, cluster)) { return i; }
    }
    return -1;
  }
  function tick(cluster, clusterState, on) {
    state.groups.forEach(function (g) { delete g.clusters[cluster]; });  // one group per cluster
    if (on) { activeGroup().clusters[cluster] = clusterState === 'removed' ? 'removed' : 'kept'; }
    save();
  }
  function exclude(object, cluster, on) {
    if (on) { state.excluded[object] = Number(cluster); } else { delete state.excluded[object]; }
    save();
  }

  // ------------------------------------------------------------------ groups.yaml
  function ids(values) { return values.map(Number).sort(function (a, b) { return a - b; }); }
  function yaml() {
    var lines = [
      '# groups.yaml from the review report of ' + (body.dataset.root || ''),
      '# model ' + (body.dataset.model || '') + '; apply: pipeline groups --file groups.yaml',
      'groups:'
    ];
    var n = 0;
    state.groups.forEach(function (g) {
      var clusters = ids(Object.keys(g.clusters));
      if (!clusters.length) { return; }
      n += 1;
      var excluded = ids(Object.keys(state.excluded).filter(function (o) {
        return clusters.indexOf(state.excluded[o]) >= 0;
      }));
      lines.push('  - name: ' + JSON.stringify(g.name));
      lines.push('    clusters: [' + clusters.join(', ') + ']');
      if (excluded.length) { lines.push('    exclude_objects: [' + excluded.join(', ') + ']'); }
      if (clusters.some(function (c) { return g.clusters[c] === 'removed'; })) {
        lines.push('    include_removed: true');
      }
    });
    if (!n) { lines[2] = 'groups: []  # tick clusters first'; }
    return lines.join('\n') + '\n';
  }
  function download() {
    var blob = new Blob([yaml()], { type: 'text/yaml' });
    var a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = 'groups.yaml';
    document.body.appendChild(a);
    a.click();
    window.setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
    message('groups.yaml downloaded');
  }
  function copy() {
    var text = yaml();
    var area = document.getElementById('gb-yaml');
    function fallback() {
      showMore(true);
      area.value = text;
      area.select();
      var ok = false;
      try { ok = document.execCommand('copy'); } catch (e) { ok = false; }
      message(ok ? 'copied' : 'select the text and copy it');
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { message('copied'); }, fallback);
    } else { fallback(); }
  }
  function message(text) {
    var m = document.getElementById('gb-message');
    if (m) { m.textContent = ' ' + text; }
  }
  function showMore(on) {
    var more = document.getElementById('gb-more');
    var button = document.getElementById('gb-show');
    if (!more) { return; }
    more.hidden = !on;
    button.setAttribute('aria-expanded', on ? 'true' : 'false');
    button.textContent = on ? 'Hide' : 'Show';
  }

  // ------------------------------------------------------------------ page <- state
  function refresh() {
    all('input.pick').forEach(function (box) {
      var g = groupOf(box.dataset.cluster);
      box.checked = g >= 0;
      var label = box.parentNode.querySelector('.pick-group');
      if (label) { label.textContent = g >= 0 ? state.groups[g].name : ''; }
      var row = box.closest('[data-item]');
      if (row) { row.classList.toggle('picked', g >= 0); }
    });
    all('input.exclude').forEach(function (box) {
      box.checked = Object.prototype.hasOwnProperty.call(state.excluded, box.dataset.object);
      var card = box.closest('.card');
      if (card) { card.classList.toggle('excluded', box.checked); }
    });
    all('svg.dots .dot').forEach(function (dot) {
      dot.classList.toggle('picked', groupOf(dot.dataset.cluster) >= 0);
    });
    var select = document.getElementById('gb-group');
    if (select) {
      select.textContent = '';
      state.groups.forEach(function (g, i) {
        var option = document.createElement('option');
        option.value = String(i);
        option.textContent = g.name + ' (' + Object.keys(g.clusters).length + ')';
        select.appendChild(option);
      });
      if (!state.groups.length) {
        var none = document.createElement('option');
        none.textContent = 'group 1 (new)';
        select.appendChild(none);
      }
      select.value = String(state.active);
    }
    var summary = document.getElementById('gb-summary');
    if (summary) {
      var clusters = state.groups.reduce(function (n, g) { return n + Object.keys(g.clusters).length; }, 0);
      summary.textContent = state.groups.length + ' group(s), ' + clusters + ' cluster(s), ' +
        Object.keys(state.excluded).length + ' excluded object(s)';
    }
    var area = document.getElementById('gb-yaml');
    if (area) { area.value = yaml(); }
    if (filter) { filter(); }
  }

  // ------------------------------------------------------------------ events
  document.addEventListener('change', function (e) {
    var t = e.target;
    if (t.matches && t.matches('input.pick')) { tick(t.dataset.cluster, t.dataset.state, t.checked); }
    else if (t.matches && t.matches('input.exclude')) { exclude(t.dataset.object, t.dataset.cluster, t.checked); }
    else if (t.id === 'gb-group') { state.active = Number(t.value) || 0; save(); }
  });
  function on(id, handler) {
    var el = document.getElementById(id);
    if (el) { el.addEventListener('click', handler); }
  }
  function typedName() {
    var input = document.getElementById('gb-name');
    var name = input ? input.value.trim() : '';
    if (input) { input.value = ''; }
    return name;
  }
  on('gb-new', function () {
    state.groups.push({ name: uniqueName(typedName() || 'group ' + (state.groups.length + 1)), clusters: {} });
    state.active = state.groups.length - 1;
    save();
  });
  on('gb-rename', function () {
    var name = typedName();
    if (!name) { message('type the new name first'); return; }
    var g = activeGroup();
    if (g.name !== name) { g.name = uniqueName(name); }
    save();
  });
  on('gb-delete', function () {
    if (state.groups.length) { state.groups.splice(state.active, 1); state.active = 0; }
    save();
  });
  on('gb-download', download);
  on('gb-copy', copy);
  on('gb-show', function () { showMore(document.getElementById('gb-more').hidden); });
  window.addEventListener('storage', function (e) { if (e.key === KEY) { state = load(); refresh(); } });

  // ------------------------------------------------------------------ sorting
  function cellValue(row, col) {
    var cell = row.querySelector('[data-col="' + col + '"]');
    return cell ? cell.dataset.value : '';
  }
  function sort(table, th) {
    var col = th.dataset.col;
    var numeric = th.dataset.type === 'num';
    var descending = th.getAttribute('aria-sort') !== 'descending';
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    var sign = descending ? -1 : 1;
    rows.sort(function (a, b) {
      var x = cellValue(a, col), y = cellValue(b, col);
      if (x === '' || y === '') { return (x === '') - (y === ''); }  // missing values last
      if (numeric) { x = parseFloat(x); y = parseFloat(y); } else { x = x.toLowerCase(); y = y.toLowerCase(); }
      return (x < y ? -1 : x > y ? 1 : 0) * sign;
    });
    all('th', table).forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', descending ? 'descending' : 'ascending');
    rows.forEach(function (r) { tbody.appendChild(r); });
  }
  all('table.sortable th[data-type]').forEach(function (th) {
    th.addEventListener('click', function () { sort(th.closest('table'), th); });
  });

  // ------------------------------------------------------------------ filters
  var filter = null;
  var fId = document.getElementById('f-id'), fTag = document.getElementById('f-tag');
  var fState = document.getElementById('f-state'), fPicked = document.getElementById('f-picked');
  var fCount = document.getElementById('f-count');
  if (fId && fTag && fState) {
    var items = all('[data-item]');
    filter = function () {
      var id = fId.value.trim(), tag = fTag.value, st = fState.value, shown = 0;
      var picked = fPicked && fPicked.checked;
      items.forEach(function (item) {
        var s = item.dataset.state;
        var ok = (!id || item.dataset.cluster === id) && (!tag || item.dataset.tag === tag) &&
          (!st || s === st || (st === 'kept' && (s === 'whole' || s === 'shrunk'))) &&
          (!picked || groupOf(item.dataset.cluster) >= 0);
        item.hidden = !ok;
        if (ok) { shown += 1; }
      });
      if (fCount) { fCount.textContent = shown + ' shown'; }
    };
    [fId, fTag, fState, fPicked].forEach(function (el) {
      if (el) { el.addEventListener('input', filter); el.addEventListener('change', filter); }
    });
  }

  // ------------------------------------------------------------------ source crops
  // A member without a thumbnail shows its source image, scaled and clipped to its box.
  function fit(img) {
    var box = img.dataset.box.split(' ').map(Number);
    var w = img.naturalWidth, h = img.naturalHeight;
    if (!w || !h) { return; }
    var x1 = Math.max(0, box[0]), y1 = Math.max(0, box[1]);
    var x2 = Math.min(w, box[2]), y2 = Math.min(h, box[3]);
    var frame = img.parentNode;
    var pw = frame.clientWidth, ph = frame.clientHeight;
    var bw = Math.max(1, x2 - x1), bh = Math.max(1, y2 - y1);
    var s = Math.min(pw / bw, ph / bh);
    img.style.width = (w * s) + 'px';
    img.style.height = (h * s) + 'px';
    img.style.left = ((pw - bw * s) / 2 - x1 * s) + 'px';
    img.style.top = ((ph - bh * s) / 2 - y1 * s) + 'px';
    img.style.clipPath = 'inset(' + (y1 * s) + 'px ' + ((w - x2) * s) + 'px ' + ((h - y2) * s) + 'px ' + (x1 * s) + 'px)';
    img.classList.add('fitted');
  }
  document.addEventListener('load', function (e) {
    if (e.target.classList && e.target.classList.contains('src-crop')) { fit(e.target); }
  }, true);
  all('img.src-crop').forEach(function (img) { if (img.complete) { fit(img); } });

  // ------------------------------------------------------------------ every member
  // A cluster page carries every member's card (JSON, once); '#kept-2' shows the second
  // page of its kept members, by cosine (the pages are the page's own anchors, so they
  // work from file:// with nothing fetched).
  var everyone = document.getElementById('all-members');
  function showMembers() {
    var match = /^#(kept|removed)-(\d+)$/.exec(window.location.hash);
    var box = document.getElementById('member-page');
    if (!everyone || !box) { return; }
    if (!match) { box.hidden = true; return; }
    var members = JSON.parse(everyone.textContent)[match[1]] || [];
    var per = Number(everyone.dataset.perPage) || 100;
    var pages = Math.max(1, Math.ceil(members.length / per));
    var page = Math.min(Math.max(1, Number(match[2])), pages);
    var first = (page - 1) * per;
    var part = members.slice(first, first + per);
    document.getElementById('member-page-title').textContent = match[1] + ' members ' +
      (part.length ? (first + 1) + '–' + (first + part.length) : '0') + ' of ' +
      members.length.toLocaleString('en') + ' (page ' + page + ' of ' + pages + ')';
    var pager = document.getElementById('member-pager');
    pager.textContent = '';
    function link(p, text, rel) {
      var a = el('a', '', text);
      a.href = '#' + match[1] + '-' + p;
      a.rel = rel;
      pager.appendChild(a);
    }
    if (page > 1) { link(page - 1, '← previous', 'prev'); }
    pager.appendChild(document.createTextNode(' page ' + page + ' of ' + pages + ' '));
    if (page < pages) { link(page + 1, 'next →', 'next'); }
    box.hidden = false;
    var grid = document.getElementById('members-grid');
    grid.textContent = '';
    var frag = document.createDocumentFragment();
    part.forEach(function (m) { frag.appendChild(card(m)); });
    grid.appendChild(frag);
    refresh();
    box.scrollIntoView();
  }
  window.addEventListener('hashchange', showMembers);

  refresh();
  showMembers();
})();
