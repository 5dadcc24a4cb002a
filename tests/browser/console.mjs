// The admin console in a real Chromium, against a running gateway (tests/console_browser.rs
// starts one and runs this script). It signs in, reads the overview's chart, creates a key
// through the UI and uses it on the gateway, revokes it and sees the gateway refuse it, visits
// every page, checks a read-only token sees no key buttons, and screenshots each page.
//
// Environment:
//   PORTCULLIS_ADMIN_URL      the admin listener, e.g. http://127.0.0.1:9001
//   PORTCULLIS_GATEWAY_URL    the client listener
//   PORTCULLIS_ADMIN_TOKEN    an admin token with the read and keys scopes
//   PORTCULLIS_READ_TOKEN     an admin token with the read scope only
//   PORTCULLIS_CLIENT         a [[clients]] id with usage recorded and API keys allowed
//   PORTCULLIS_DEPLOYMENT     the deployment to call (default gpt-4o)
//   PORTCULLIS_BACKEND        a backend name the backends page must show (optional)
//   PORTCULLIS_SCREENSHOTS    where to write overview.png, clients.png, keys.png, backends.png
//   PORTCULLIS_CHROMIUM       the browser (default /usr/bin/chromium)
//
// Exit code 0 only if every check held; each failure is printed.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined || v === '') {
    console.error(`console.mjs: ${name} is not set`);
    process.exit(2);
  }
  return v;
};

const ADMIN = env('PORTCULLIS_ADMIN_URL').replace(/\/$/, '');
const GATEWAY = env('PORTCULLIS_GATEWAY_URL').replace(/\/$/, '');
const TOKEN = env('PORTCULLIS_ADMIN_TOKEN');
const READ_TOKEN = env('PORTCULLIS_READ_TOKEN');
const CLIENT = env('PORTCULLIS_CLIENT');
const DEPLOYMENT = env('PORTCULLIS_DEPLOYMENT', 'gpt-4o');
const BACKEND = process.env.PORTCULLIS_BACKEND || null;
const SHOTS = env('PORTCULLIS_SCREENSHOTS');
const CHROMIUM = env('PORTCULLIS_CHROMIUM', '/usr/bin/chromium');

const WAIT = 15000;
const EXPECTED_CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const failures = [];
let passed = 0;

// Run one check; a failure is recorded and the run goes on (later checks that need its result
// say so themselves).
async function check(name, fn) {
  const started = Date.now();
  try {
    const detail = await fn();
    passed += 1;
    console.log(`ok   ${name}${detail ? ` (${detail})` : ''} [${Date.now() - started} ms]`);
    return true;
  } catch (e) {
    failures.push(`${name}: ${e && e.message ? e.message : e}`);
    console.log(`FAIL ${name}: ${e && e.stack ? e.stack : e}`);
    return false;
  }
}

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

async function adminJson(pathname, token) {
  const res = await fetch(`${ADMIN}${pathname}`, { headers: { Authorization: `Bearer ${token}` } });
  const body = await res.json();
  return { status: res.status, body };
}

async function chat(key) {
  const res = await fetch(`${GATEWAY}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'api-key': key, 'content-type': 'application/json' },
    body: JSON.stringify({ model: DEPLOYMENT, messages: [{ role: 'user', content: 'Hello from the console test' }] }),
  });
  const text = await res.text();
  return { status: res.status, text };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

fs.mkdirSync(SHOTS, { recursive: true });
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'portcullis-chromium-'));
let context;

// Console errors the page must not have: script errors and CSP violations. A failed load is
// the browser reporting a 401 the test asked for.
const consoleErrors = [];

try {
  // ---- the static files, without a browser --------------------------------------------
  await check('GET / redirects to /dashboard/', async () => {
    for (const p of ['/', '/dashboard']) {
      const res = await fetch(`${ADMIN}${p}`, { redirect: 'manual' });
      assert(res.status >= 300 && res.status < 400, `${p}: status ${res.status}`);
      const loc = res.headers.get('location') || '';
      assert(new URL(loc, ADMIN).pathname === '/dashboard/', `${p}: location ${loc}`);
    }
  });

  await check('the dashboard is served with its CSP and holds no secret', async () => {
    for (const f of ['', 'app.js', 'app.css', 'favicon.svg']) {
      const res = await fetch(`${ADMIN}/dashboard/${f}`);
      assert(res.status === 200, `/dashboard/${f}: status ${res.status}`);
      const csp = res.headers.get('content-security-policy');
      assert(csp === EXPECTED_CSP, `/dashboard/${f}: content-security-policy ${csp}`);
      const text = await res.text();
      for (const secret of [TOKEN, READ_TOKEN]) assert(!text.includes(secret), `/dashboard/${f} contains an admin token`);
      assert(!/pcl_[a-z2-7]{8}_/.test(text), `/dashboard/${f} contains an API key`);
      if (f === '') {
        assert(!/<style|style="|\son[a-z]+=|<script>/i.test(text), 'index.html has inline style or script');
      }
    }
  });

  // ---- the browser ------------------------------------------------------------------------
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 800 },
    deviceScaleFactor: 1,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
  });
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) consoleErrors.push(m.text());
  });
  page.on('pageerror', (e) => consoleErrors.push(`uncaught: ${e.message}`));

  const ready = (name) => page.waitForSelector(`#page > .view-${name}[data-ready="true"]`);
  const visit = async (name) => {
    await page.evaluate((n) => { location.hash = `#/${n}`; }, name);
    await ready(name);
  };
  const signIn = async (token) => {
    await page.fill('#signin-token', token);
    await page.click('#signin-submit');
    await page.waitForSelector('#app:not([hidden])');
  };

  await check('the sign-in form is shown', async () => {
    await page.goto(`${ADMIN}/`);
    assert(new URL(page.url()).pathname === '/dashboard/', `landed on ${page.url()}`);
    await page.waitForSelector('#signin:not([hidden])');
  });

  await check('a wrong token shows the API\'s error message', async () => {
    const wrong = 'not-a-portcullis-admin-token';
    const { status, body } = await adminJson('/admin/whoami', wrong);
    assert(status === 401, `whoami with a wrong token: ${status}`);
    await page.fill('#signin-token', wrong);
    await page.click('#signin-submit');
    await page.waitForSelector('#signin-error:not([hidden])');
    const shown = await page.textContent('#signin-error');
    assert(shown.includes(body.error.message), `shown "${shown}", API said "${body.error.message}"`);
    assert(await page.isHidden('#app'), 'the console opened with a wrong token');
  });

  const who = (await adminJson('/admin/whoami', TOKEN)).body;
  await check('signing in shows the token\'s name and scopes', async () => {
    await signIn(TOKEN);
    const name = await page.textContent('#who-name');
    assert(name === who.name, `header shows "${name}", whoami says "${who.name}"`);
    const scopes = await page.$$eval('#who-scopes .badge', (b) => b.map((x) => x.textContent));
    assert(JSON.stringify(scopes) === JSON.stringify(who.scopes), `scopes shown ${scopes}, whoami ${who.scopes}`);
    assert(scopes.includes('read') && scopes.includes('keys'), `the test token's scopes: ${scopes}`);
    const stored = await page.evaluate(() => ({
      session: Object.values(sessionStorage), local: localStorage.length, cookie: document.cookie,
    }));
    assert(stored.session.includes(TOKEN), 'the token is not in sessionStorage');
    assert(stored.local === 0, 'something was written to localStorage');
    assert(stored.cookie === '', `document.cookie is "${stored.cookie}"`);
    assert((await context.cookies()).length === 0, 'the browser holds cookies');
    return `${name}: ${scopes.join(', ')}`;
  });

  await check('the overview draws the usage chart with the client\'s requests', async () => {
    await visit('overview');
    await page.waitForSelector('#usage-chart svg');
    // Bar segments: the rects of the chart's bar group (each with its tooltip).
    const BARS = 'g.bars rect, rect.bar';
    const drawn = await page.$eval('#usage-chart svg', (svg, sel) => ({
      rects: svg.querySelectorAll('rect').length,
      bars: svg.querySelectorAll(sel).length,
      text: svg.textContent,
      ns: svg.namespaceURI,
    }), BARS);
    assert(drawn.ns === 'http://www.w3.org/2000/svg', `chart root namespace ${drawn.ns}`);
    assert(drawn.text.includes(CLIENT), `the chart's legend does not name ${CLIENT}: "${drawn.text.slice(0, 200)}"`);
    assert(!drawn.text.includes('No usage in this time range'), 'the chart says there is no usage');
    // What the API renders for the same query, to compare with what the page imported.
    const res = await fetch(`${ADMIN}/admin/usage/chart.svg?since=24h&metric=requests&split=client&buckets=48`, {
      headers: { Authorization: `Bearer ${TOKEN}` },
    });
    const served = await page.evaluate(([text, sel]) => {
      const svg = new DOMParser().parseFromString(text, 'image/svg+xml').documentElement;
      return { rects: svg.querySelectorAll('rect').length, bars: svg.querySelectorAll(sel).length };
    }, [await res.text(), BARS]);
    assert(drawn.rects === served.rects, `the page drew ${drawn.rects} rects, the API's SVG has ${served.rects}`);
    assert(drawn.bars > 0 && drawn.bars === served.bars, `the page drew ${drawn.bars} bar segments, the API's SVG has ${served.bars}`);
    const requests = await page.$eval('.tile .tile-value', (t) => t.textContent);
    assert(Number(requests.replace(/[^0-9]/g, '')) > 0, `the requests tile shows ${requests}`);
    const row = await page.$$eval('[data-table="usage-client"] tbody tr td:first-child', (tds) => tds.map((t) => t.textContent));
    assert(row.includes(CLIENT), `the by-client table lists ${row}`);
    await page.waitForSelector('#refusals-chart svg');
    await page.screenshot({ path: path.join(SHOTS, 'overview.png') });
    return `${drawn.bars} bar segments, requests tile ${requests}`;
  });

  await check('the 1-hour range shows what the test sent in the last hour', async () => {
    await page.click('[aria-label="Time range"] [data-value="1h"]');
    await page.waitForFunction(() => location.hash.includes('since=1h'));
    await ready('overview');
    await page.waitForSelector('#usage-chart svg');
    const report = (await adminJson('/admin/usage?by=client&since=1h', TOKEN)).body;
    const expected = report.data.reduce((n, r) => n + r.requests, 0);
    const tile = await page.$eval('.tile .tile-value', (t) => t.textContent);
    assert(Number(tile.replace(/[^0-9]/g, '')) === expected, `the requests tile shows ${tile}, the API ${expected}`);
    const bars = await page.$$eval('#usage-chart svg g.bars rect, #usage-chart svg rect.bar', (r) => r.length);
    assert(bars > 0, 'no bar in the last hour');
    const legend = await page.$eval('#usage-chart svg', (svg) => svg.textContent);
    assert(legend.includes(CLIENT), `the 1-hour chart does not name ${CLIENT}`);
    return `${expected} requests, ${bars} bar segments`;
  });

  let key = null;
  let keyId = null;
  await check('a key created in the UI is shown once in a dialog', async () => {
    await visit('keys');
    await page.click('#create-key');
    await page.waitForSelector('#create-dialog[open]');
    await page.selectOption('#create-client', CLIENT);
    await page.fill('#create-name', 'console-test');
    await page.selectOption('#create-expiry', '1d');
    await page.click('#create-submit');
    await page.waitForSelector('#key-dialog[open]');
    key = (await page.textContent('#new-key-value')).trim();
    assert(/^pcl_[a-z2-7]{8}_[a-z2-7]+$/.test(key), `the dialog shows "${key}"`);
    keyId = key.split('_')[1];
    const text = await page.textContent('#key-dialog');
    assert(/shown only once/i.test(text), 'no shown-once warning in the dialog');
    assert(text.includes(CLIENT), 'the dialog does not name the client');
    await page.click('#key-dialog-close');
    await page.waitForSelector('#key-dialog', { state: 'hidden' });
    const left = await page.evaluate(() => document.getElementById('new-key-value').textContent);
    assert(left === '', 'the key is still in the closed dialog');
    const html = await page.content();
    assert(!html.includes(key), 'the key is still in the page');
    const stores = await page.evaluate(() => JSON.stringify([Object.values(sessionStorage), Object.values(localStorage)]));
    assert(!stores.includes(key), 'the key was stored in the browser');
    await page.waitForSelector(`tr[data-key-id="${keyId}"][data-status="active"]`);
    return keyId;
  });

  await check('the gateway accepts the new key', async () => {
    assert(key, 'no key was created');
    const r = await chat(key);
    assert(r.status === 200, `chat with the new key: ${r.status} ${r.text.slice(0, 300)}`);
  });

  await check('the keys page lists the key (screenshot)', async () => {
    assert(keyId, 'no key was created');
    const cells = await page.$$eval(`tr[data-key-id="${keyId}"] td`, (tds) => tds.map((t) => t.textContent));
    assert(cells.some((c) => c.includes('console-test')), `row: ${cells}`);
    await page.screenshot({ path: path.join(SHOTS, 'keys.png') });
  });

  await check('revoking the key in the UI makes the gateway refuse it', async () => {
    assert(keyId, 'no key was created');
    await page.click(`tr[data-key-id="${keyId}"] [data-action="revoke"]`);
    await page.waitForSelector('#confirm-dialog[open]');
    assert((await page.textContent('#confirm-title')).includes(keyId), 'the confirmation does not name the key');
    await page.click('#confirm-ok');
    await page.waitForSelector(`tr[data-key-id="${keyId}"][data-status="revoked"]`);
    // The replica that answered the DELETE refuses at once; allow for polling elsewhere.
    const deadline = Date.now() + 10000;
    let last;
    for (;;) {
      last = await chat(key);
      if (last.status === 401) break;
      assert(Date.now() < deadline, `still ${last.status} 10 s after the revocation`);
      await sleep(100);
    }
    const code = JSON.parse(last.text).error.code;
    return `401 ${code}`;
  });

  await check('the clients page shows the client (screenshot)', async () => {
    await visit('clients');
    await page.waitForSelector(`[data-client="${CLIENT}"]`);
    const head = await page.textContent(`[data-client="${CLIENT}"] h2`);
    assert(head === CLIENT, `card title ${head}`);
    await page.screenshot({ path: path.join(SHOTS, 'clients.png') });
  });

  await check('the backends page shows the backends (screenshot)', async () => {
    await visit('backends');
    const names = await page.$$eval('[data-backend]', (cards) => cards.map((c) => c.dataset.backend));
    assert(names.length > 0, 'no backend shown');
    if (BACKEND) assert(names.includes(BACKEND), `backends shown: ${names}`);
    const api = (await adminJson('/admin/backends', TOKEN)).body.data.map((b) => b.name);
    assert(JSON.stringify(names) === JSON.stringify(api), `shown ${names}, the API lists ${api}`);
    await page.screenshot({ path: path.join(SHOTS, 'backends.png') });
    return names.join(', ');
  });

  await check('a 401 during the session goes back to sign-in with a message', async () => {
    await page.route('**/admin/clients', (r) => r.fulfill({
      status: 401,
      contentType: 'application/json',
      body: JSON.stringify({ error: { message: 'admin token not recognised (test)', type: 'invalid_request_error', code: 'invalid_admin_token', param: null } }),
    }));
    try {
      await page.evaluate(() => { location.hash = '#/clients'; });
      await page.waitForSelector('#signin:not([hidden])');
      const msg = await page.textContent('#signin-message');
      assert(msg.includes('admin token not recognised (test)'), `sign-in says "${msg}"`);
      assert(await page.evaluate(() => sessionStorage.length) === 0, 'the token is still in sessionStorage');
    } finally {
      await page.unroute('**/admin/clients');
    }
  });

  await check('signing out forgets the token', async () => {
    await signIn(TOKEN);
    await page.click('#signout');
    await page.waitForSelector('#signin:not([hidden])');
    assert(await page.evaluate(() => sessionStorage.length) === 0, 'the token is still in sessionStorage');
    await page.reload();
    await page.waitForSelector('#signin:not([hidden])');
  });

  await check('a read-only token sees the keys but no button to change them', async () => {
    await signIn(READ_TOKEN);
    const scopes = await page.$$eval('#who-scopes .badge', (b) => b.map((x) => x.textContent));
    assert(JSON.stringify(scopes) === '["read"]', `scopes shown: ${scopes}`);
    await visit('keys');
    const rows = await page.$$eval('#keys-table tbody tr', (r) => r.length);
    assert(rows > 0, 'the read-only token sees no keys');
    assert(await page.$('#create-key') === null, 'a create button is shown');
    assert(await page.$('[data-action="revoke"], [data-action="rotate"]') === null, 'a revoke or rotate button is shown');
    return `${rows} keys listed`;
  });

  await check('no script error or CSP violation in the console', async () => {
    assert(consoleErrors.length === 0, consoleErrors.join(' | '));
  });
} catch (e) {
  failures.push(`unexpected: ${e && e.stack ? e.stack : e}`);
} finally {
  if (context) await context.close().catch(() => {});
  fs.rmSync(profile, { recursive: true, force: true });
}

console.log(`console checks: ${passed} held, ${failures.length} failed`);
if (failures.length) {
  for (const f of failures) console.log(`  failed: ${f}`);
  process.exit(1);
}
