// The Portcullis admin console: plain JavaScript, no framework, no build step, no third-party
// code. Everything it shows comes from the admin API on this same origin (src/admin/openapi.json),
// called with the admin token the user typed, as `Authorization: Bearer`. The token lives in this
// tab's sessionStorage and nowhere else (no cookie). Every piece of API data is put into the DOM as
// text (textContent, createElement, setAttribute): client ids, key names and error messages are
// attacker-influenced. The charts are SVG documents the gateway renders; they are parsed as
// image/svg+xml, checked, stripped of anything active, and imported.
'use strict';

(() => {
  const TOKEN_KEY = 'portcullis.admin-token';
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const REFRESH_MS = 30000;

  const RANGES = [
    { id: '1h', label: '1 hour', buckets: 60, bucket: 'minute' },
    { id: '24h', label: '24 hours', buckets: 48, bucket: '30 minutes' },
    { id: '7d', label: '7 days', buckets: 56, bucket: '3 hours' },
    { id: '30d', label: '30 days', buckets: 30, bucket: 'day' },
  ];
  const METRICS = [
    { id: 'requests', label: 'Requests' },
    { id: 'tokens', label: 'Tokens' },
    { id: 'cost', label: 'Cost' },
    { id: 'errors', label: 'Errors' },
  ];
  const SPLITS = [
    { id: 'client', label: 'By client' },
    { id: 'deployment', label: 'By deployment' },
  ];
  const SCOPE_HELP = {
    read: 'read: clients, keys, usage, backends, metrics',
    keys: 'keys: create, rotate and revoke API keys',
    config: 'config: reload the configuration',
    tokens: 'tokens: manage admin tokens',
  };

  const state = {
    token: null,
    who: null,
    refreshTimer: null,
    rendering: null,
  };

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------------------------------
  // DOM helpers. `el` never parses markup: strings become text nodes.

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === 'class') node.className = value;
      else if (name === 'text') node.textContent = String(value);
      else if (name.startsWith('on') && typeof value === 'function') {
        node.addEventListener(name.slice(2), value);
      } else if (name === 'dataset') Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function badge(text, kind, title) {
    return el('span', { class: `badge ${kind || ''}`.trim(), title }, text);
  }

  function chip(text) {
    return el('code', { class: 'chip' }, text);
  }

  function loading(text) {
    return el('div', { class: 'loading', role: 'status' }, text || 'Loading…');
  }

  function empty(title, ...hint) {
    return el('div', { class: 'empty' }, el('p', { class: 'empty-title' }, title),
      hint.length ? el('p', { class: 'empty-hint' }, ...hint) : null);
  }

  function errorBox(err) {
    const message = err instanceof ApiError ? err.message : String(err && err.message || err);
    const code = err instanceof ApiError && err.code ? err.code : null;
    const hint = err instanceof ApiError ? errorHint(err) : null;
    return el('div', { class: 'error-box', role: 'alert' },
      el('strong', {}, err instanceof ApiError && err.status ? `Error ${err.status}` : 'Error'),
      code ? el('code', { class: 'error-code' }, code) : null,
      el('p', {}, message),
      hint ? el('p', { class: 'muted' }, hint) : null);
  }

  function errorHint(err) {
    if (err.status === 403) return 'This admin token lacks the scope this needs. Sign in with a token that has it.';
    if (err.status === 503) return 'The store is not configured for this, or it did not answer.';
    if (err.status === 0) return 'Check that the gateway is running and this page is served by its admin listener.';
    return null;
  }

  function panel(title, subtitle, ...body) {
    return el('section', { class: 'panel' },
      title ? el('div', { class: 'panel-head' },
        el('h2', {}, title),
        subtitle ? el('p', { class: 'panel-sub' }, subtitle) : null) : null,
      ...body);
  }

  // ---------------------------------------------------------------------------------------
  // Formatting.

  const intFmt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const compactFmt = new Intl.NumberFormat(undefined, { notation: 'compact', maximumFractionDigits: 1 });
  const timeFmt = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  const timeSecFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit' });

  function num(n) {
    return n === null || n === undefined ? '—' : intFmt.format(n);
  }

  function compact(n) {
    return Math.abs(n) < 10000 ? intFmt.format(n) : compactFmt.format(n);
  }

  function usd(n) {
    if (n === null || n === undefined) return '—';
    const digits = n !== 0 && Math.abs(n) < 1 ? 4 : 2;
    return new Intl.NumberFormat(undefined, {
      style: 'currency', currency: 'USD', minimumFractionDigits: 2, maximumFractionDigits: digits,
    }).format(n);
  }

  // Budgets: cents are not enough to see a few requests' cost.
  function amount(n, unit) {
    if (unit === 'usd') {
      return n === null || n === undefined ? '—' : new Intl.NumberFormat(undefined, {
        style: 'currency', currency: 'USD', minimumFractionDigits: 2, maximumFractionDigits: Math.abs(n) < 1000 ? 4 : 2,
      }).format(n);
    }
    return `${num(n)} ${unit}`;
  }

  function when(iso) {
    if (!iso) return '—';
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : timeFmt.format(d);
  }

  function relative(iso) {
    if (!iso) return '';
    const t = new Date(iso).getTime();
    if (Number.isNaN(t)) return '';
    return duration(t - Date.now());
  }

  // "in 5 min" / "5 min ago".
  function duration(ms) {
    const future = ms > 0;
    const s = Math.round(Math.abs(ms) / 1000);
    let text;
    if (s < 60) text = `${s} s`;
    else if (s < 3600) text = `${Math.round(s / 60)} min`;
    else if (s < 86400 * 2) text = `${Math.round(s / 3600)} h`;
    else text = `${Math.round(s / 86400)} days`;
    return future ? `in ${text}` : `${text} ago`;
  }

  function timeCell(iso) {
    if (!iso) return el('span', { class: 'muted' }, '—');
    return el('time', { datetime: iso, title: new Date(iso).toISOString() },
      when(iso), el('span', { class: 'muted small' }, ` · ${relative(iso)}`));
  }

  // ---------------------------------------------------------------------------------------
  // The admin API.

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function request(path, token, opts) {
    const o = opts || {};
    const headers = { Authorization: `Bearer ${token}`, Accept: o.accept || 'application/json' };
    if (o.body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch(path, {
        method: o.method || 'GET',
        headers,
        body: o.body === undefined ? undefined : JSON.stringify(o.body),
        credentials: 'omit',
        cache: 'no-store',
        redirect: 'error',
      });
    } catch (e) {
      throw new ApiError(0, 'network', `The admin listener did not answer (${e.message}).`);
    }
    if (!res.ok) {
      let message = `The admin API answered ${res.status} ${res.statusText}`.trim();
      let code = null;
      try {
        const body = await res.json();
        if (body && body.error && typeof body.error.message === 'string') {
          message = body.error.message;
          code = typeof body.error.code === 'string' ? body.error.code : null;
        }
      } catch (_) { /* not JSON: keep the status line */ }
      throw new ApiError(res.status, code, message);
    }
    return o.accept === 'image/svg+xml' ? res.text() : res.json();
  }

  // An API call of the signed-in session: a 401 ends the session.
  async function api(path, opts) {
    try {
      return await request(path, state.token, opts);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        showSignIn(`Signed out: the gateway no longer accepts this token (${e.message}). Sign in again.`);
      }
      throw e;
    }
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== '') q.set(k, v);
    const s = q.toString();
    return s ? `?${s}` : '';
  }

  function has(scope) {
    return Boolean(state.who && Array.isArray(state.who.scopes) && state.who.scopes.includes(scope));
  }

  // ---------------------------------------------------------------------------------------
  // Session: sign-in, whoami, sign-out.

  function showSignIn(message) {
    state.token = null;
    state.who = null;
    sessionStorage.removeItem(TOKEN_KEY);
    stopRefresh();
    closeDialogs();
    clear($('page'));
    $('app').hidden = true;
    $('boot').hidden = true;
    $('signin').hidden = false;
    const note = $('signin-message');
    note.textContent = message || '';
    note.hidden = !message;
    $('signin-error').hidden = true;
    $('signin-token').value = '';
    $('signin-token').focus();
  }

  function showApp() {
    $('boot').hidden = true;
    $('signin').hidden = true;
    $('app').hidden = false;
    $('who-name').textContent = state.who.name;
    const scopes = clear($('who-scopes'));
    for (const s of state.who.scopes) scopes.append(badge(s, 'scope', SCOPE_HELP[s] || s));
    if (!location.hash || location.hash === '#' || location.hash === '#/') {
      location.replace('#/overview');
    }
    route();
    startRefresh();
  }

  // Only printable ASCII can go in a header; anything else is not a token the gateway issued.
  function plausibleToken(t) {
    return /^[\x21-\x7e]+$/.test(t);
  }

  async function signIn(event) {
    event.preventDefault();
    const input = $('signin-token');
    const error = $('signin-error');
    const button = $('signin-submit');
    const token = input.value.trim();
    error.hidden = true;
    if (!token) {
      error.textContent = 'Paste an admin token first.';
      error.hidden = false;
      return;
    }
    if (!plausibleToken(token)) {
      error.textContent = 'That is not an admin token: tokens are printable ASCII without spaces.';
      error.hidden = false;
      return;
    }
    button.disabled = true;
    button.textContent = 'Signing in…';
    try {
      const who = await request('/admin/whoami', token);
      state.token = token;
      state.who = who;
      sessionStorage.setItem(TOKEN_KEY, token);
      input.value = '';
      $('signin-message').hidden = true;
      showApp();
    } catch (e) {
      error.textContent = e instanceof ApiError && e.status === 401
        ? `The gateway refused this token: ${e.message}`
        : e.message;
      error.hidden = false;
      input.select();
    } finally {
      button.disabled = false;
      button.textContent = 'Sign in';
    }
  }

  async function boot() {
    $('signin-form').addEventListener('submit', signIn);
    $('signout').addEventListener('click', () => showSignIn('Signed out. The token was removed from this tab.'));
    window.addEventListener('hashchange', () => route());
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden && state.who) refresh();
    });
    setupDialogs();

    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) {
      showSignIn(null);
      return;
    }
    try {
      state.who = await request('/admin/whoami', token);
      state.token = token;
      showApp();
    } catch (e) {
      showSignIn(e instanceof ApiError && e.status === 401
        ? `Signed out: the gateway no longer accepts this token (${e.message}). Sign in again.`
        : e.message);
    }
  }

  // ---------------------------------------------------------------------------------------
  // Routing: #/overview, #/clients, #/keys, #/backends (with ?query for the page's state).

  const PAGES = {
    overview: renderOverview,
    clients: renderClients,
    keys: renderKeys,
    backends: renderBackends,
  };

  function parseHash() {
    const raw = location.hash.replace(/^#\/?/, '');
    const at = raw.indexOf('?');
    const page = (at < 0 ? raw : raw.slice(0, at)) || 'overview';
    const params = new URLSearchParams(at < 0 ? '' : raw.slice(at + 1));
    return { page, params };
  }

  function setHash(page, params) {
    location.hash = `#/${page}${query(params)}`;
  }

  // Render the page the hash names. `quiet`: an automatic refresh, swapped in when complete.
  async function route(quiet) {
    if (!state.who) return;
    const { page, params } = parseHash();
    const render = PAGES[page];
    if (!render) {
      location.replace('#/overview');
      return;
    }
    for (const a of document.querySelectorAll('.tabs a')) {
      if (a.dataset.page === page) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    document.title = `${page[0].toUpperCase()}${page.slice(1)} · Portcullis`;
    if (!quiet && $('toast')) $('toast').hidden = true;
    const root = el('div', { class: `view view-${page}`, dataset: { page } });
    const target = $('page');
    const done = render(root, params);
    state.rendering = done;
    if (!quiet) {
      clear(target).append(root);
      target.dataset.page = page;
    }
    try {
      await done;
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) root.append(errorBox(e));
    }
    if (quiet && state.rendering === done && state.who && target.dataset.page === page) {
      clear(target).append(root);
    }
    if (state.rendering === done) root.dataset.ready = 'true';
  }

  function refresh() {
    const { page } = parseHash();
    if (page === 'keys') return; // the list changes only by what is done here
    if (document.querySelector('dialog[open]')) return;
    route(true);
  }

  function startRefresh() {
    stopRefresh();
    state.refreshTimer = setInterval(() => {
      if (!document.hidden && state.who) refresh();
    }, REFRESH_MS);
  }

  function stopRefresh() {
    if (state.refreshTimer) clearInterval(state.refreshTimer);
    state.refreshTimer = null;
  }

  function pageHead(title, subtitle, ...controls) {
    return el('div', { class: 'page-head' },
      el('div', {}, el('h1', {}, title), subtitle ? el('p', { class: 'page-sub' }, subtitle) : null),
      controls.length ? el('div', { class: 'controls' }, ...controls) : null);
  }

  function segmented(label, options, current, onPick) {
    return el('div', { class: 'seg', role: 'group', 'aria-label': label },
      options.map((o) => el('button', {
        type: 'button',
        class: 'seg-button',
        'aria-pressed': o.id === current ? 'true' : 'false',
        dataset: { value: o.id },
        onclick: () => onPick(o.id),
      }, o.label)));
  }

  // Run `work` into `slot`, replacing its placeholder with the result or an error.
  async function fill(slot, work) {
    try {
      const node = await work();
      clear(slot).append(node);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) throw e;
      clear(slot).append(errorBox(e));
    }
  }

  // ---------------------------------------------------------------------------------------
  // Charts: SVG documents rendered by the gateway, fetched with the bearer header.

  const BLOCKED_ELEMENTS = new Set(['script', 'foreignobject', 'iframe', 'embed', 'object', 'style', 'audio', 'video', 'image', 'use', 'animate', 'set', 'animatetransform', 'animatemotion']);

  function sanitizeSvg(root) {
    const doomed = [];
    const walker = root.ownerDocument.createTreeWalker(root, NodeFilter.SHOW_ELEMENT);
    for (let node = walker.currentNode; node; node = walker.nextNode()) {
      if (node.namespaceURI !== SVG_NS || BLOCKED_ELEMENTS.has(node.localName.toLowerCase())) {
        doomed.push(node);
        continue;
      }
      for (const attr of Array.from(node.attributes)) {
        const name = attr.name.toLowerCase();
        if (name.startsWith('on') || name === 'style' || name.endsWith('href')) node.removeAttribute(attr.name);
      }
    }
    for (const node of doomed) if (node !== root) node.remove();
  }

  function importSvg(text) {
    const doc = new DOMParser().parseFromString(text, 'image/svg+xml');
    const root = doc.documentElement;
    if (!root || root.namespaceURI !== SVG_NS || root.localName !== 'svg'
        || doc.getElementsByTagName('parsererror').length > 0) {
      throw new Error('The gateway sent a chart that is not an SVG document.');
    }
    sanitizeSvg(root);
    if (!root.hasAttribute('viewBox')) {
      const w = parseFloat(root.getAttribute('width'));
      const hgt = parseFloat(root.getAttribute('height'));
      if (w > 0 && hgt > 0) root.setAttribute('viewBox', `0 0 ${w} ${hgt}`);
    }
    root.removeAttribute('width');
    root.removeAttribute('height');
    if (!root.hasAttribute('role')) root.setAttribute('role', 'img');
    const node = document.importNode(root, true);
    node.classList.add('chart-svg');
    return node;
  }

  async function chart(path, label) {
    const text = await api(path, { accept: 'image/svg+xml' });
    return el('figure', { class: 'chart', 'aria-label': label }, importSvg(text));
  }

  // ---------------------------------------------------------------------------------------
  // Overview: usage charts and totals from the store, refusals from this replica.

  function sumRows(rows) {
    const t = { requests: 0, prompt_tokens: 0, completion_tokens: 0, cached_tokens: 0, total_tokens: 0, cost_usd: 0 };
    for (const r of rows) for (const k of Object.keys(t)) t[k] += Number(r[k]) || 0;
    return t;
  }

  function tile(label, value, sub, kind) {
    return el('div', { class: `tile ${kind || ''}`.trim() },
      el('div', { class: 'tile-label' }, label),
      el('div', { class: 'tile-value' }, value),
      sub ? el('div', { class: 'tile-sub' }, sub) : null);
  }

  function usageTable(rows, what) {
    if (!rows.length) return empty(`No usage by ${what} in this range.`);
    const sorted = rows.slice().sort((a, b) => b.requests - a.requests || b.total_tokens - a.total_tokens);
    const label = what === 'client' ? 'Client' : 'Deployment';
    return el('table', { class: 'data', dataset: { table: `usage-${what}` } },
      el('thead', {}, el('tr', {},
        el('th', {}, label), el('th', { class: 'num' }, 'Requests'),
        el('th', { class: 'num' }, 'Tokens'), el('th', { class: 'num' }, 'Cost'))),
      el('tbody', {}, sorted.map((r) => el('tr', {},
        el('td', {}, r.key === null
          ? el('span', { class: 'muted' }, what === 'client' ? '(none)' : '(no deployment)')
          : el('span', { class: 'mono' }, r.key)),
        el('td', { class: 'num' }, num(r.requests)),
        el('td', { class: 'num', title: `${num(r.prompt_tokens)} prompt (${num(r.cached_tokens)} cached), ${num(r.completion_tokens)} completion (${num(r.reasoning_tokens)} reasoning)` },
          num(r.total_tokens),
          el('div', { class: 'muted small' }, `${compact(r.prompt_tokens)} in · ${compact(r.completion_tokens)} out`)),
        el('td', { class: 'num' }, usd(r.cost_usd))))));
  }

  function refusalsTable(data) {
    const rows = (data.by_reason || []).slice().sort((a, b) => b.count - a.count);
    if (!rows.length) return empty('Nothing refused or failed in this window.', 'Refusals (401, 403, 429, …) and backend errors show up here by their error code.');
    return el('table', { class: 'data compact', dataset: { table: 'refusals' } },
      el('thead', {}, el('tr', {}, el('th', {}, 'Reason'), el('th', { class: 'num' }, 'Status'), el('th', { class: 'num' }, 'Count'))),
      el('tbody', {}, rows.map((r) => el('tr', {},
        el('td', {}, el('code', {}, r.code)),
        el('td', { class: 'num' }, statusBadge(r.status)),
        el('td', { class: 'num' }, num(r.count))))));
  }

  function statusBadge(status) {
    const kind = status >= 500 ? 'bad' : status === 429 ? 'warn' : 'neutral';
    return badge(String(status), kind);
  }

  async function renderOverview(root, params) {
    const range = RANGES.find((r) => r.id === params.get('since')) || RANGES[1];
    const metric = METRICS.find((m) => m.id === params.get('metric')) || METRICS[0];
    const split = SPLITS.find((s) => s.id === params.get('split')) || SPLITS[0];
    const go = (change) => setHash('overview', { since: range.id, metric: metric.id, split: split.id, ...change });
    // The refusal counters cover at most the last 24 hours.
    const refusalSince = range.id === '1h' ? '1h' : '24h';

    root.append(pageHead('Overview', 'Usage recorded in the store by every replica.',
      segmented('Time range', RANGES.map((r) => ({ id: r.id, label: r.id })), range.id, (v) => go({ since: v })),
      segmented('Metric', METRICS, metric.id, (v) => go({ metric: v })),
      segmented('Split', SPLITS, split.id, (v) => go({ split: v }))));

    const tiles = el('div', { class: 'tiles-slot' }, loading());
    const chartSlot = el('div', { class: 'chart-slot', id: 'usage-chart' }, loading('Drawing the chart…'));
    const hint = el('div', { class: 'chart-hint' });
    const byClient = el('div', {}, loading());
    const byDeployment = el('div', {}, loading());
    const refusalsChart = el('div', { class: 'chart-slot', id: 'refusals-chart' }, loading());
    const refusalsList = el('div', {}, loading());
    const refusalsSub = el('p', { class: 'panel-sub' }, `This replica's own count since it started, last ${refusalSince === '1h' ? 'hour' : '24 hours'}; other replicas keep their own.`);

    root.append(tiles,
      panel(`${metric.label} over the last ${range.label}`, `${split.label.toLowerCase()}, one bar per ${range.bucket}`, chartSlot, hint),
      el('div', { class: 'grid-2' },
        panel('By client', null, byClient),
        panel('By deployment', null, byDeployment)),
      el('section', { class: 'panel' },
        el('div', { class: 'panel-head' }, el('h2', {}, 'Refusals and errors by reason'), refusalsSub),
        el('div', { class: 'grid-refusals' }, refusalsChart, refusalsList)));

    const since = range.id;
    const clientsP = api(`/admin/usage${query({ by: 'client', since })}`);
    const deploymentsP = api(`/admin/usage${query({ by: 'deployment', since })}`);
    const refusalsP = api(`/admin/refusals${query({ since: refusalSince })}`);
    // Failures are shown where they happen; keep unhandled-rejection noise out of the console.
    for (const p of [clientsP, deploymentsP, refusalsP]) p.catch(() => {});

    await Promise.all([
      fill(tiles, async () => {
        const report = await clientsP;
        const t = sumRows(report.data);
        let refused = null;
        try { refused = (await refusalsP).total; } catch (e) { if (e.status === 401) throw e; }
        if (t.requests === 0) {
          clear(hint).append(el('p', { class: 'empty-hint' },
            'Send a request through the gateway, or pick a longer range. Usage records reach the store in batches (every ',
            el('code', {}, 'store.usage_flush'), ', 1 s by default), and only while ', el('code', {}, 'store.record_usage'), ' is on.'));
        } else clear(hint);
        return el('div', { class: 'tiles' },
          tile('Requests', compact(t.requests), `${report.data.length} ${report.data.length === 1 ? 'client' : 'clients'} in the last ${range.label}`),
          tile('Tokens', compact(t.total_tokens), `${compact(t.prompt_tokens)} prompt · ${compact(t.completion_tokens)} completion`),
          tile('Cost', usd(t.cost_usd), 'priced from [prices]'),
          tile('Refused', refused === null ? '—' : compact(refused), `this replica, last ${refusalSince}`, refused ? 'warn' : ''));
      }),
      fill(chartSlot, () => chart(`/admin/usage/chart.svg${query({ since, metric: metric.id, split: split.id, buckets: range.buckets })}`,
        `${metric.label} over the last ${range.label}, ${split.label.toLowerCase()}`)),
      fill(byClient, async () => usageTable((await clientsP).data, 'client')),
      fill(byDeployment, async () => usageTable((await deploymentsP).data, 'deployment')),
      fill(refusalsChart, () => chart(`/admin/refusals/chart.svg${query({ since: refusalSince })}`, 'Refusals and errors by reason')),
      fill(refusalsList, async () => {
        const r = await refusalsP;
        refusalsSub.textContent = `This replica's own count since it started (${when(r.replica_started)}), over the last ${refusalSince === '1h' ? 'hour' : '24 hours'}; other replicas keep their own. ${num(r.total)} in all.`;
        return refusalsTable(r);
      }),
    ]);
  }

  // ---------------------------------------------------------------------------------------
  // Clients: policy, limits and what they have left now.

  const LIMIT_LABEL = {
    requests_per_minute: 'Requests per minute',
    tokens_per_minute: 'Tokens per minute',
    token_quota: 'Token quota',
    budget: 'Budget',
  };
  const COUNTERS = {
    memory: 'Counted in this replica’s memory.',
    redis: 'Counted in Redis, shared by every replica.',
    unavailable: 'Redis did not answer: what remains is unknown right now.',
    none: null,
  };

  function authBadges(a) {
    const out = [];
    for (const j of a.jwt || []) out.push(badge(`JWT · ${j.issuer}`, 'auth', `JWT from ${j.issuer} with claims ${JSON.stringify(j.claims)}`));
    for (const c of a.certificates || []) {
      const desc = Object.entries(c).map(([k, v]) => `${k}=${v}`).join(', ');
      out.push(badge('Client certificate', 'auth', desc));
    }
    if (a.api_keys) out.push(badge('API keys', 'auth'));
    if (a.anonymous) out.push(badge('Anonymous', 'warn', 'Requests with no credential at all are this client'));
    if (!out.length) out.push(badge('No way to authenticate', 'bad'));
    return out;
  }

  function limitRow(l) {
    const period = l.period ? ` per ${l.period}` : '';
    const scope = l.scope === 'deployments' && l.deployments
      ? el('span', { class: 'muted' }, ' on ', l.deployments.map((d, i) => [i ? ', ' : '', chip(d)]))
      : null;
    const remaining = l.remaining;
    const frac = remaining === null || !(l.limit > 0) ? null : Math.max(0, Math.min(1, remaining / l.limit));
    const meter = frac === null
      ? el('div', { class: 'meter-unknown' }, 'unknown')
      : el('meter', {
        min: '0', max: String(l.limit), value: String(Math.max(0, remaining)),
        low: String(l.limit * 0.15), high: String(l.limit * 0.4), optimum: String(l.limit),
        title: `${Math.round(frac * 100)}% left`,
      });
    let resets = el('span', { class: 'muted' }, 'nothing used yet');
    if (l.resets_at) {
      const at = new Date(l.resets_at);
      const ahead = at.getTime() - Date.now();
      resets = el('span', { class: 'muted' }, ahead <= 0 ? 'resets now'
        : `resets ${ahead < 86400000 ? timeSecFmt.format(at) : when(l.resets_at)} (${relative(l.resets_at)})`);
    }
    return el('div', { class: 'limit', dataset: { kind: l.kind } },
      el('div', { class: 'limit-line' },
        el('div', { class: 'limit-name' }, `${LIMIT_LABEL[l.kind] || l.kind}${period}`, scope),
        el('div', { class: 'limit-figures' },
          el('strong', {}, remaining === null ? '?' : amount(remaining, l.unit)),
          el('span', { class: 'muted' }, ` left of ${amount(l.limit, l.unit)}`))),
      meter,
      el('div', { class: 'limit-reset' }, resets));
  }

  function perSubject(set) {
    const parts = [];
    if (set.requests_per_minute != null) parts.push(`${num(set.requests_per_minute)} requests/min`);
    if (set.tokens_per_minute != null) parts.push(`${num(set.tokens_per_minute)} tokens/min`);
    if (set.token_quota) parts.push(`${num(set.token_quota.tokens)} tokens per ${set.token_quota.period}`);
    if (set.budget) parts.push(`${usd(set.budget.usd)} per ${set.budget.period}`);
    return parts.length ? parts.join(' · ') : null;
  }

  function listOrNone(items, none) {
    return items && items.length ? el('div', { class: 'chips' }, items.map(chip)) : el('span', { class: 'muted' }, none);
  }

  function clientCard(c) {
    const scopes = Object.entries(c.deployment_scopes || {});
    const subject = c.per_subject ? perSubject(c.per_subject) : null;
    const counters = COUNTERS[c.counters];
    return el('article', { class: 'card client', dataset: { client: c.id } },
      el('header', { class: 'card-head' },
        el('h2', { class: 'mono' }, c.id),
        el('div', { class: 'badges' }, authBadges(c.authentication)),
        c.authentication.api_keys
          ? el('a', { class: 'button ghost small', href: `#/keys${query({ client: c.id })}` }, 'Keys →')
          : null),
      el('div', { class: 'card-body' },
        el('dl', { class: 'facts' },
          el('dt', {}, 'Deployments'), el('dd', {}, listOrNone(c.deployments, 'none: every call is refused')),
          el('dt', {}, 'Operations'), el('dd', {}, listOrNone(c.operations, 'none: every call is refused')),
          scopes.length ? [el('dt', {}, 'Required scopes'), el('dd', {}, scopes.map(([glob, need]) =>
            el('div', {}, chip(glob), ' needs ', need.map((n, i) => [i ? ', ' : '', chip(n)]))))] : null,
          el('dt', {}, 'In flight'), el('dd', {},
            el('strong', {}, num(c.in_flight)),
            c.max_concurrent_requests != null
              ? el('span', { class: 'muted' }, ` of at most ${num(c.max_concurrent_requests)} at once`)
              : el('span', { class: 'muted' }, ' (no concurrency limit)')),
          subject ? [el('dt', {}, 'Per user'), el('dd', {}, subject)] : null),
        el('div', { class: 'limits' },
          el('h3', {}, 'Limits now'),
          c.limits.length
            ? [c.limits.map(limitRow), counters ? el('p', { class: 'fine' }, counters) : null]
            : el('p', { class: 'muted' }, 'No rate limit, quota or budget.'))));
  }

  function reloadButton() {
    const out = el('span', { class: 'reload-outcome', role: 'status' });
    const button = el('button', {
      type: 'button',
      class: 'button',
      onclick: async () => {
        button.disabled = true;
        out.textContent = 'Reloading…';
        try {
          const r = await api('/admin/reload', { method: 'POST' });
          out.textContent = r.outcome === 'applied' || r.applied ? 'Applied.' : 'Done.';
          setTimeout(() => route(), 300);
        } catch (e) {
          if (e.status !== 401) out.textContent = e.message;
        } finally {
          button.disabled = false;
        }
      },
    }, 'Reload the configuration');
    return el('div', { class: 'empty-actions' }, button, out);
  }

  async function renderClients(root) {
    root.append(pageHead('Clients', 'Who may call what, and what their limits have left right now.'));
    const slot = el('div', {}, loading());
    root.append(slot);
    await fill(slot, async () => {
      const list = (await api('/admin/clients')).data;
      if (!list.length) {
        return el('section', { class: 'panel' }, empty('No clients are configured, so every request is refused.',
          'Add a ', el('code', {}, '[[clients]]'), ' entry to the configuration and reload (',
          el('code', {}, 'portcullis reload'), ', SIGHUP, or a change to the file).'),
        has('config') ? reloadButton() : null);
      }
      return el('div', { class: 'cards' }, list.map(clientCard));
    });
  }

  // ---------------------------------------------------------------------------------------
  // Keys: list, create, rotate, revoke.

  const keysUi = { reload: null, clients: [] };

  function statusOf(k) {
    if (k.status === 'active') return badge('active', 'ok');
    if (k.status === 'expired') return badge('expired', 'neutral');
    return badge('revoked', 'bad');
  }

  function keysTable(keys, canManage) {
    return el('table', { class: 'data', id: 'keys-table' },
      el('thead', {}, el('tr', {},
        el('th', {}, 'Key id'), el('th', {}, 'Client'), el('th', {}, 'Name'), el('th', {}, 'Created'),
        el('th', {}, 'Expires'), el('th', {}, 'Last used'), el('th', {}, 'Status'),
        canManage ? el('th', { class: 'actions' }, el('span', { class: 'visually-hidden' }, 'Actions')) : null)),
      el('tbody', {}, keys.map((k) => el('tr', { dataset: { keyId: k.id, status: k.status } },
        el('td', {}, el('code', {}, k.id)),
        el('td', {}, el('span', { class: 'mono' }, k.client)),
        el('td', {}, k.name === null ? el('span', { class: 'muted' }, '—') : k.name),
        el('td', {}, timeCell(k.created)),
        el('td', {}, k.expires ? timeCell(k.expires) : el('span', { class: 'muted' }, 'never')),
        el('td', {}, k.last_used ? timeCell(k.last_used) : el('span', { class: 'muted' }, 'never')),
        el('td', {}, statusOf(k), k.revoked ? el('div', { class: 'muted small' }, when(k.revoked)) : null),
        canManage ? el('td', { class: 'actions' }, k.status === 'active' ? [
          el('button', { type: 'button', class: 'button small', dataset: { action: 'rotate' }, title: `Issue a new key for ${k.client} and let its other keys end`, onclick: () => openCreate('rotate', k.client) }, 'Rotate'),
          el('button', { type: 'button', class: 'button small danger-ghost', dataset: { action: 'revoke' }, onclick: () => confirmRevoke(k) }, 'Revoke'),
        ] : null) : null))));
  }

  async function renderKeys(root, params) {
    const filter = params.get('client') || '';
    const canManage = has('keys');
    const select = el('select', {
      id: 'keys-filter',
      'aria-label': 'Filter by client',
      onchange: () => setHash('keys', { client: select.value }),
    }, el('option', { value: '' }, 'All clients'));
    const create = canManage
      ? el('button', { type: 'button', class: 'button primary', id: 'create-key', onclick: () => openCreate('create', filter) }, 'Create key')
      : null;
    root.append(pageHead('API keys', canManage
      ? 'Gateway-issued keys (pcl_…). The gateway stores only their hash: a key is shown once, when it is created.'
      : 'Gateway-issued keys (pcl_…). This token has no keys scope: the list is read-only.',
    el('label', { class: 'inline-label', for: 'keys-filter' }, 'Client'), select, create));

    const slot = el('section', { class: 'panel flush' }, loading());
    root.append(slot);

    const clientsP = api('/admin/clients').then((r) => r.data).catch((e) => {
      if (e.status === 401) throw e;
      return null;
    });

    const load = async () => {
      const keys = (await api(`/admin/keys${query({ client: filter })}`)).data;
      if (!keys.length) {
        if (filter) {
          return empty(`No keys for client ${filter}.`, canManage
            ? 'Create a key for it with the Create key button; it is shown once.'
            : 'A token with the keys scope can create one here, or run portcullis keys create.');
        }
        return empty('No keys yet.', canManage
          ? 'Create a key with the Create key button above: pick a client, a name and an expiry. It is shown once.'
          : 'Create a key with a token that has the keys scope, or with ', el('code', {}, 'portcullis keys create --client ID'), '.');
      }
      return keysTable(keys, canManage);
    };
    keysUi.reload = async () => {
      if (!slot.isConnected) return;
      await fill(slot, load);
    };

    await Promise.all([
      fill(slot, load),
      (async () => {
        const clients = await clientsP;
        keysUi.clients = clients || [];
        const ids = clients ? clients.map((c) => c.id) : [];
        if (filter && !ids.includes(filter)) ids.push(filter);
        for (const id of ids) select.append(el('option', { value: id }, id));
        select.value = filter;
        if (create && clients && !clients.some((c) => c.authentication.api_keys)) {
          create.disabled = true;
          create.title = 'No client accepts API keys: set [store] key_hmac_secret';
        }
      })(),
    ]);
  }

  // ---------------------------------------------------------------------------------------
  // Dialogs.

  const dialogState = { mode: 'create', confirm: null };

  function closeDialogs() {
    for (const d of document.querySelectorAll('dialog[open]')) d.close();
  }

  function setupDialogs() {
    const keyDialog = $('key-dialog');
    // The key is wiped from the page when the dialog closes, however it closes (Esc too).
    const wipe = () => {
      $('new-key-value').textContent = '';
      $('new-key-copied').textContent = '';
      $('key-dialog-summary').textContent = '';
      $('key-dialog-rolled').textContent = '';
    };
    keyDialog.addEventListener('close', wipe);
    $('key-dialog-close').addEventListener('click', () => {
      wipe();
      keyDialog.close();
    });
    $('new-key-copy').addEventListener('click', copyKey);

    $('create-form').addEventListener('submit', submitCreate);
    $('create-cancel').addEventListener('click', () => $('create-dialog').close());

    $('confirm-cancel').addEventListener('click', () => $('confirm-dialog').close());
    $('confirm-ok').addEventListener('click', async () => {
      const action = dialogState.confirm;
      if (!action) return;
      const ok = $('confirm-ok');
      const err = $('confirm-error');
      ok.disabled = true;
      err.hidden = true;
      try {
        await action();
        $('confirm-dialog').close();
      } catch (e) {
        if (e.status !== 401) {
          err.textContent = e.message;
          err.hidden = false;
        }
      } finally {
        ok.disabled = false;
      }
    });
    $('confirm-dialog').addEventListener('close', () => { dialogState.confirm = null; });
  }

  function selectKey() {
    const range = document.createRange();
    range.selectNodeContents($('new-key-value'));
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }

  async function copyKey() {
    const note = $('new-key-copied');
    try {
      await navigator.clipboard.writeText($('new-key-value').textContent);
      note.textContent = 'Copied to the clipboard.';
    } catch (_) {
      // The clipboard API needs a secure context (https, or loopback).
      selectKey();
      note.textContent = 'Selected: press Ctrl+C (⌘C) to copy.';
    }
  }

  function showKey(key, record, rolled) {
    const d = $('key-dialog');
    $('key-dialog-summary').textContent = `Key ${record.id} for client ${record.client}${record.name ? ` (${record.name})` : ''}, ${record.expires ? `expires ${when(record.expires)}` : 'never expires'}.`;
    const r = $('key-dialog-rolled');
    if (rolled && rolled.length) {
      const ends = rolled.map((k) => k.expires).filter(Boolean).sort()[0];
      r.textContent = `${rolled.length} older ${rolled.length === 1 ? 'key' : 'keys'} of ${record.client} now ${ends ? `end ${when(ends)} (${relative(ends)})` : 'end'}.`;
      r.hidden = false;
    } else r.hidden = true;
    $('new-key-value').textContent = key;
    $('new-key-copied').textContent = '';
    d.showModal();
    selectKey();
    $('new-key-copy').focus();
  }

  function openCreate(mode, client) {
    dialogState.mode = mode;
    const rotate = mode === 'rotate';
    $('create-dialog-title').textContent = rotate ? `Rotate the keys of ${client}` : 'Create an API key';
    $('create-help').textContent = rotate
      ? 'Issues a new key for this client; its other active keys keep working until the grace ends, so it can switch without downtime.'
      : 'The key is shown once, right after it is created.';
    $('create-submit').textContent = rotate ? 'Rotate' : 'Create key';
    $('create-grace-row').hidden = !rotate;
    $('create-error').hidden = true;
    $('create-name').value = '';
    const select = clear($('create-client'));
    const usable = keysUi.clients.filter((c) => c.authentication.api_keys).map((c) => c.id);
    const ids = usable.length ? usable : keysUi.clients.map((c) => c.id);
    if (client && !ids.includes(client)) ids.unshift(client);
    if (!ids.length) select.append(el('option', { value: '' }, 'no clients configured'));
    for (const id of ids) select.append(el('option', { value: id }, id));
    if (client) select.value = client;
    select.disabled = rotate;
    $('create-dialog').showModal();
    (rotate ? $('create-name') : select).focus();
  }

  async function submitCreate(event) {
    event.preventDefault();
    const err = $('create-error');
    const submit = $('create-submit');
    const client = $('create-client').value;
    const name = $('create-name').value.trim();
    const expires = $('create-expiry').value;
    err.hidden = true;
    if (!client) {
      err.textContent = 'Pick a client. Clients are [[clients]] entries in the configuration.';
      err.hidden = false;
      return;
    }
    submit.disabled = true;
    try {
      const body = { client, name: name || null, expires_in: expires || null };
      if (dialogState.mode === 'rotate') {
        body.grace = $('create-grace').value;
        const r = await api('/admin/keys/rotate', { method: 'POST', body });
        $('create-dialog').close();
        showKey(r.key, r.record, r.rolled);
      } else {
        const r = await api('/admin/keys', { method: 'POST', body });
        $('create-dialog').close();
        showKey(r.key, r, null);
      }
      if (keysUi.reload) keysUi.reload();
    } catch (e) {
      if (e.status !== 401) {
        err.textContent = e.message;
        err.hidden = false;
      }
    } finally {
      submit.disabled = false;
    }
  }

  function confirmRevoke(k) {
    $('confirm-title').textContent = `Revoke key ${k.id}?`;
    $('confirm-text').textContent = `Requests with this key of ${k.client}${k.name ? ` (${k.name})` : ''} are refused by this replica at once and by the others within the store's refresh interval. This cannot be undone.`;
    $('confirm-ok').textContent = 'Revoke key';
    $('confirm-error').hidden = true;
    dialogState.confirm = async () => {
      await api(`/admin/keys/${encodeURIComponent(k.id)}`, { method: 'DELETE' });
      toast(`Key ${k.id} revoked.`);
      if (keysUi.reload) keysUi.reload();
    };
    $('confirm-dialog').showModal();
    $('confirm-cancel').focus();
  }

  let toastTimer = null;
  function toast(text) {
    let t = $('toast');
    if (!t) {
      t = el('div', { id: 'toast', class: 'toast', role: 'status' });
      document.body.append(t);
    }
    t.textContent = text;
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
  }

  // ---------------------------------------------------------------------------------------
  // Backends: pool position, credential, circuit, probe, in flight, cool-downs and room.

  function circuitCell(hl) {
    if (hl.circuit === 'open') {
      return [badge('open', 'bad'), hl.circuit_open_until ? el('div', { class: 'muted small' }, `until ${timeSecFmt.format(new Date(hl.circuit_open_until))} (${relative(hl.circuit_open_until)})`) : null];
    }
    if (hl.circuit === 'half_open') return badge('half-open: probing', 'warn');
    return badge('closed', 'ok');
  }

  function probeCell(p) {
    if (p === null || p === undefined) return el('span', { class: 'muted' }, 'no probe configured');
    return p ? badge('passing', 'ok') : badge('failing', 'bad');
  }

  function stat(label, ...value) {
    return el('div', { class: 'stat' }, el('div', { class: 'stat-label' }, label), el('div', { class: 'stat-value' }, ...value));
  }

  function backendCard(b) {
    const hl = b.health || {};
    const cred = b.credential || {};
    const deployments = Object.entries(b.deployments || {});
    return el('article', { class: `card backend ${b.usable ? '' : 'unusable'}`.trim(), dataset: { backend: b.name } },
      el('header', { class: 'card-head' },
        el('h2', { class: 'mono' }, b.name),
        b.usable ? badge('usable', 'ok') : badge(`not usable${b.unusable_because ? `: ${b.unusable_because}` : ''}`, 'bad'),
        el('span', { class: 'muted url mono', title: b.url }, b.url),
        el('span', { class: 'muted small pool' }, `priority ${b.priority} · weight ${b.weight}`)),
      el('div', { class: 'stats' },
        stat('Circuit', circuitCell(hl),
          hl.consecutive_failures ? el('div', { class: 'muted small' }, `${hl.consecutive_failures} failures in a row`) : null,
          hl.trips ? el('div', { class: 'muted small' }, `tripped ${hl.trips}×`) : null),
        stat('Health probe', probeCell(hl.probe_healthy)),
        stat('In flight', el('strong', {}, num(hl.in_flight)),
          b.max_concurrent != null ? el('span', { class: 'muted' }, ` / ${num(b.max_concurrent)}`) : null),
        stat('Credential', cred.ready ? badge('ready', 'ok') : badge('not ready', 'bad'),
          el('div', { class: 'small' }, cred.kind, cred.identity ? el('span', { class: 'muted' }, ` · ${cred.identity}`) : null),
          cred.problem ? el('div', { class: 'small bad-text' }, cred.problem) : null),
        stat('Last error', hl.last_error
          ? [el('div', { class: 'small bad-text last-error' }, hl.last_error), hl.last_error_at ? el('div', { class: 'muted small' }, relative(hl.last_error_at)) : null]
          : el('span', { class: 'muted' }, 'none'))),
      deployments.length
        ? el('table', { class: 'data compact deployments' },
          el('thead', {}, el('tr', {},
            el('th', {}, 'Deployment'), el('th', {}, 'Upstream name'), el('th', {}, 'Cool-down'),
            el('th', { class: 'num' }, 'Tokens left'), el('th', { class: 'num' }, 'Requests left'), el('th', { class: 'num' }, 'Reported'))),
          el('tbody', {}, deployments.map(([name, d]) => el('tr', { dataset: { deployment: name } },
            el('td', {}, el('span', { class: 'mono' }, name)),
            el('td', {}, el('span', { class: 'mono muted' }, d.upstream)),
            el('td', {}, d.cooling_until || d.cooling_ms
              ? [badge(`cooling ${d.cooling_ms != null ? `${(d.cooling_ms / 1000).toFixed(1)} s` : ''}`.trim(), 'warn'),
                d.cooling_because ? el('span', { class: 'muted small' }, ` ${d.cooling_because}`) : null]
              : el('span', { class: 'muted' }, '—')),
            el('td', { class: 'num' }, num(d.remaining_tokens)),
            el('td', { class: 'num' }, num(d.remaining_requests)),
            el('td', { class: 'num muted' }, d.reported_secs_ago != null ? duration(-d.reported_secs_ago * 1000) : 'not yet'))))) 
        : el('p', { class: 'muted pad' }, 'No deployments.'));
  }

  async function renderBackends(root) {
    root.append(pageHead('Backends', 'What this replica knows of each backend: its pool, credential, health, and the room Azure last reported.'));
    const slot = el('div', {}, loading());
    root.append(slot);
    await fill(slot, async () => {
      const list = (await api('/admin/backends')).data;
      if (!list.length) {
        return el('section', { class: 'panel' }, empty('No backends are configured.',
          'Add a ', el('code', {}, '[[backends]]'), ' entry to the configuration and reload.'));
      }
      const usable = list.filter((b) => b.usable).length;
      return el('div', {},
        el('p', { class: 'summary-line' }, el('strong', {}, `${usable} of ${list.length}`), ` ${list.length === 1 ? 'backend' : 'backends'} usable now.`),
        el('div', { class: 'cards' }, list.map(backendCard)));
    });
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
  else boot();
})();
