// A real OpenID provider (panva/oidc-provider) for the Portcullis test suite.
//
//   node tests/idp/idp.mjs
//
// Listens on 127.0.0.1 on an ephemeral port, prints one JSON line on stdout when ready
//   {"issuer":"http://127.0.0.1:PORT","port":PORT,"jwks_uri":"...","token_endpoint":"..."}
// and exits when stdin closes, so a test that dies never leaves it running. Everything
// else goes to stderr. The Rust side is tests/common/idp.rs; the control API is described
// in tests/idp/README.md.
//
// What is real: discovery, the JWKS, the token endpoint and client authentication
// (client_secret_basic, client_secret_post, private_key_jwt with jti replay detection) are
// oidc-provider's own. What is ours: the /__test/ control endpoints, the outage switch and
// request counters in front of the provider, and the choice of key and extra claims for
// each client's access tokens.

import * as crypto from 'node:crypto';
import * as http from 'node:http';

// oidc-provider prints its notices with console.info, i.e. on stdout, which carries our
// ready line. Send console output to stderr, and drop the runtime notice: it asks for
// Node 22, and this suite runs (and is tested) on Node 20.
const quiet = [/^oidc-provider WARNING: Unsupported runtime/];
for (const name of ['log', 'info', 'warn', 'error', 'debug']) {
  console[name] = (...args) => {
    const line = args.map(String).join(' ');
    if (!quiet.some((re) => re.test(line))) process.stderr.write(`${line}\n`);
  };
}
const { default: Provider, errors } = await import('oidc-provider');

// ---------------------------------------------------------------------------------------
// State. It outlives Provider instances: the provider is rebuilt when its keys change.

const KEY_TYPES = {
  RS256: { type: 'rsa', options: { modulusLength: 2048 }, prefix: 'rsa' },
  PS256: { type: 'rsa', options: { modulusLength: 2048 }, prefix: 'rsa-pss' },
  ES256: { type: 'ec', options: { namedCurve: 'P-256' }, prefix: 'ec' },
  ES384: { type: 'ec', options: { namedCurve: 'P-384' }, prefix: 'ec384' },
};

/** Every key ever created, in creation order: { kid, alg, privateKey, published }. */
const keys = [];
/** The kid that signs new access tokens, per alg. */
const active = {};
/** Registered clients: client_id → { metadata (oidc-provider's), extras (ours) }. */
const clients = new Map();
/** Which endpoint groups answer with an error, and with which status. */
const outage = { endpoints: new Set(), status: 503 };
/** Milliseconds the token endpoint waits before answering (a slow IdP). */
let tokenDelayMs = 0;
const stats = { discovery: 0, jwks: 0, token: 0 };
/** The last token requests, newest last (for tests of what a client sent). */
const tokenRequests = [];
const TOKEN_REQUESTS_KEPT = 100;
let jwksMaxAge; // seconds, or undefined for no Cache-Control from us

function addKey(alg, { kid, activate = true } = {}) {
  const kt = KEY_TYPES[alg];
  if (!kt) throw new Error(`unsupported alg ${alg} (one of ${Object.keys(KEY_TYPES).join(', ')})`);
  const n = keys.filter((k) => k.alg === alg).length + 1;
  const id = kid ?? `${kt.prefix}-${n}`;
  if (keys.some((k) => k.kid === id)) throw new Error(`kid ${id} exists`);
  const { privateKey } = crypto.generateKeyPairSync(kt.type, kt.options);
  keys.push({ kid: id, alg, privateKey, published: true });
  if (activate) active[alg] = id;
  return id;
}

// ---------------------------------------------------------------------------------------
// Storage adapter: one process-wide store shared by every Provider instance, so a rebuild
// keeps issued artefacts and jti replay records. Clients come from `clients`.

const store = new Map(); // `${model}:${id}` → { payload, expiresAt }

class Adapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const expiresAt = expiresIn ? Date.now() + expiresIn * 1000 : Infinity;
    store.set(this.key(id), { payload, expiresAt });
  }

  async find(id) {
    if (this.model === 'Client') return clients.get(id)?.metadata;
    const entry = store.get(this.key(id));
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      store.delete(this.key(id));
      return undefined;
    }
    return entry.payload;
  }

  async findByUserCode() {
    return undefined;
  }

  async findByUid() {
    return undefined;
  }

  async consume(id) {
    const entry = store.get(this.key(id));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const [k, v] of store) if (v.payload.grantId === grantId) store.delete(k);
  }
}

// ---------------------------------------------------------------------------------------
// Clients. The control endpoint takes oidc-provider client metadata plus our extras:
//   access_token_alg     RS256 (default) | PS256 | ES256 | ES384: signs this client's tokens
//   access_token_claims  object merged into the token payload last (may override sub,
//                        client_id, ...; a null value removes the claim)
//   access_token_header  object merged into the JOSE header (e.g. {"typ":"JWT"})
//   access_token_ttl     seconds (default 3600)
//   access_token_scopes  space-separated allowlist: other requested scopes are left out of
//                        the token (oidc-provider's own `scope` metadata only takes the
//                        provider's OpenID scopes, so it cannot say this)
//   assertion_max_age    private_key_jwt: refuse assertions whose exp - iat (or exp - nbf)
//                        exceeds this many seconds (Entra allows 10 minutes)
// and, to register keys the way Entra registers a certificate (turned into the client's
// `jwks` metadata here, not kept):
//   jwks_pem             array of PEM certificates or SPKI public keys: the client's `jwks`
//                        are their public keys as JWKs
//   jwks_alg             set this `alg` on each of those JWKs (by default none: an RSA key
//                        then verifies RS256 and PS256 assertions alike)
//   jwks_kid             array of kids, one per PEM (by default none: see the README on kid)

const EXTRAS = [
  'access_token_alg',
  'access_token_claims',
  'access_token_header',
  'access_token_ttl',
  'access_token_scopes',
  'assertion_max_age',
];

const PEM_EXTRAS = ['jwks_pem', 'jwks_alg', 'jwks_kid'];

/** The public key of a PEM certificate or SPKI public key, as a JWK. */
function pemToJwk(pem, i) {
  if (typeof pem !== 'string') throw new Error(`jwks_pem[${i}] must be a PEM string`);
  try {
    const key = pem.includes('-----BEGIN CERTIFICATE-----')
      ? new crypto.X509Certificate(pem).publicKey
      : crypto.createPublicKey(pem);
    if (key.type !== 'public') throw new Error('not a public key');
    return key.export({ format: 'jwk' });
  } catch (err) {
    throw new Error(`jwks_pem[${i}] is not a certificate or public key: ${err.message}`);
  }
}

/** `jwks_pem` (+ `jwks_alg`, `jwks_kid`) → the client's `jwks` metadata. */
function pemJwks(body) {
  const { jwks_pem: pems, jwks_alg: alg, jwks_kid: kids } = body;
  if (pems === undefined) {
    if (alg !== undefined || kids !== undefined) throw new Error('jwks_alg and jwks_kid need jwks_pem');
    return undefined;
  }
  if (!Array.isArray(pems) || pems.length === 0) throw new Error('jwks_pem must be a non-empty array of PEM strings');
  if (body.jwks !== undefined) throw new Error('give jwks or jwks_pem, not both');
  if (alg !== undefined && typeof alg !== 'string') throw new Error('jwks_alg must be a string');
  if (kids !== undefined && !(Array.isArray(kids) && kids.length === pems.length && kids.every((k) => typeof k === 'string' && k))) {
    throw new Error('jwks_kid must be an array of non-empty strings, one per jwks_pem entry');
  }
  return {
    keys: pems.map((pem, i) => ({
      ...pemToJwk(pem, i),
      ...(alg === undefined ? {} : { alg }),
      ...(kids === undefined ? {} : { kid: kids[i] }),
    })),
  };
}

function splitClient(body) {
  if (!body || typeof body !== 'object' || Array.isArray(body)) throw new Error('body must be a JSON object');
  if (typeof body.client_id !== 'string' || !body.client_id) throw new Error('client_id is required');
  const jwks = pemJwks(body);
  const metadata = {
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  };
  const extras = { access_token_alg: 'RS256', access_token_ttl: 3600 };
  for (const [k, v] of Object.entries(body)) {
    if (PEM_EXTRAS.includes(k)) continue;
    if (EXTRAS.includes(k)) extras[k] = v;
    else if (/^(access_token|assertion)_/.test(k)) throw new Error(`unknown extra ${k} (one of ${EXTRAS.join(', ')})`);
    else metadata[k] = v;
  }
  if (jwks) metadata.jwks = jwks;
  if (!KEY_TYPES[extras.access_token_alg]) throw new Error(`access_token_alg must be one of ${Object.keys(KEY_TYPES).join(', ')}`);
  if (extras.access_token_scopes !== undefined && typeof extras.access_token_scopes !== 'string') throw new Error('access_token_scopes must be a string');
  if (!Number.isInteger(extras.access_token_ttl) || extras.access_token_ttl <= 0) throw new Error('access_token_ttl must be a positive integer');
  for (const k of ['access_token_claims', 'access_token_header']) {
    if (extras[k] !== undefined && (typeof extras[k] !== 'object' || Array.isArray(extras[k]) || extras[k] === null)) {
      throw new Error(`${k} must be an object`);
    }
  }
  return { metadata, extras };
}

// ---------------------------------------------------------------------------------------
// The provider.

let issuer;
let current; // { provider, callback }

function providerConfiguration() {
  return {
    adapter: Adapter,
    clients: [],
    jwks: {
      keys: keys.map(({ kid, alg, privateKey }) => ({
        ...privateKey.export({ format: 'jwk' }), kid, alg, use: 'sig',
      })),
    },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    routes: { jwks: '/jwks', token: '/token' },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      revocation: { enabled: false },
      resourceIndicators: {
        enabled: true,
        // Entra's v2 endpoint names the resource in the scope: `{resource}/.default`.
        defaultResource(ctx) {
          const scopes = (ctx.oidc.params.scope ?? '').split(' ');
          const dflt = scopes.find((s) => s.endsWith('/.default'));
          return dflt ? dflt.slice(0, -'/.default'.length) : undefined;
        },
        getResourceServerInfo(ctx, resource, client) {
          const extras = clients.get(client.clientId)?.extras;
          if (!extras) throw new errors.InvalidClient('client not registered');
          const alg = extras.access_token_alg;
          const kid = active[alg];
          if (!kid) throw new errors.InvalidTarget(`no ${alg} key at the IdP`);
          let scopes = (ctx.oidc.params.scope ?? '').split(' ')
            .filter((s) => s && !s.endsWith('/.default'));
          if (extras.access_token_scopes !== undefined) {
            const allowed = new Set(extras.access_token_scopes.split(' '));
            scopes = scopes.filter((s) => allowed.has(s));
          }
          return {
            scope: scopes.join(' '),
            audience: resource,
            accessTokenTTL: extras.access_token_ttl,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg, kid } },
          };
        },
      },
    },
    formats: {
      customizers: {
        jwt(ctx, token, jwt) {
          const extras = clients.get(token.clientId)?.extras ?? {};
          for (const [k, v] of Object.entries(extras.access_token_claims ?? {})) {
            if (v === null) delete jwt.payload[k];
            else jwt.payload[k] = v;
          }
          if (extras.access_token_header) jwt.header = { ...extras.access_token_header };
        },
      },
    },
    async assertJwtClientAuthClaimsAndHeader(ctx, claims, _header, client) {
      // RFC 7523 3: sub must be the client_id (oidc-provider itself checks iss, aud, exp, jti).
      if (claims.sub !== client.clientId) {
        throw new errors.InvalidClientAuth('sub (JWT subject) must be the client_id');
      }
      const maxAge = clients.get(client.clientId)?.extras.assertion_max_age;
      if (maxAge !== undefined) {
        const start = claims.iat ?? claims.nbf;
        if (start === undefined || claims.exp - start > maxAge) {
          throw new errors.InvalidClientAuth(`client assertion must live at most ${maxAge}s`);
        }
      }
    },
    ttl: {
      ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? 600,
    },
  };
}

function buildProvider() {
  const provider = new Provider(issuer, providerConfiguration());
  provider.on('server_error', (ctx, err) => console.error('idp: server_error', err));
  // Why a token request failed (the response only says e.g. "client authentication failed").
  provider.on('grant.error', (ctx, err) => { ctx.state.errorDetail = err.error_detail; });

  provider.use(async (ctx, next) => {
    await next();
    if (ctx.path === '/jwks' && ctx.status === 200 && ctx.body?.keys) {
      const published = new Set(keys.filter((k) => k.published).map((k) => k.kid));
      ctx.body = { keys: ctx.body.keys.filter((k) => published.has(k.kid)) };
      if (jwksMaxAge !== undefined) ctx.set('Cache-Control', `max-age=${jwksMaxAge}`);
    }
    if (ctx.path === '/token') {
      tokenRequests.push({
        status: ctx.status,
        client_id: ctx.oidc?.client?.clientId ?? null,
        auth_scheme: (ctx.get('authorization') || '').split(' ')[0] || null,
        params: { ...(ctx.oidc?.body ?? {}) },
        error: ctx.body?.error ?? null,
        error_description: ctx.body?.error_description ?? null,
        error_detail: ctx.state.errorDetail ?? null,
      });
      if (tokenRequests.length > TOKEN_REQUESTS_KEPT) tokenRequests.shift();
    }
  });

  return { provider, callback: provider.callback() };
}

// ---------------------------------------------------------------------------------------
// HTTP: control endpoints, outage and counters, then the provider.

function endpointOf(path) {
  if (path === '/.well-known/openid-configuration' || path === '/.well-known/oauth-authorization-server') return 'discovery';
  if (path === '/jwks') return 'jwks';
  if (path === '/token') return 'token';
  return undefined;
}

function send(res, status, body) {
  if (body === undefined) {
    res.writeHead(status).end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' }).end(text);
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : undefined;
}

function keyView(k) {
  return {
    kid: k.kid,
    alg: k.alg,
    kty: k.privateKey.asymmetricKeyType === 'rsa' ? 'RSA' : 'EC',
    published: k.published,
    active: active[k.alg] === k.kid,
    private_pem: k.privateKey.export({ type: 'pkcs8', format: 'pem' }),
    public_pem: crypto.createPublicKey(k.privateKey).export({ type: 'spki', format: 'pem' }),
    public_jwk: {
      ...crypto.createPublicKey(k.privateKey).export({ format: 'jwk' }), kid: k.kid, alg: k.alg, use: 'sig',
    },
  };
}

function findKey(kid) {
  const key = keys.find((k) => k.kid === kid);
  if (!key) throw Object.assign(new Error(`unknown kid ${kid}`), { status: 404 });
  return key;
}

async function control(req, res, url) {
  const route = `${req.method} ${url.pathname}`;
  const q = url.searchParams;
  switch (route) {
    case 'POST /__test/clients': {
      const { metadata, extras } = splitClient(await readJson(req));
      await current.provider.Client.validate(metadata);
      clients.set(metadata.client_id, { metadata, extras });
      return send(res, 201, { client_id: metadata.client_id });
    }
    case 'POST /__test/rotate': {
      const alg = q.get('alg') ?? 'RS256';
      const kid = addKey(alg, { kid: q.get('kid') ?? undefined, activate: q.get('activate') !== 'false' });
      current = buildProvider();
      return send(res, 200, { kid, alg });
    }
    case 'POST /__test/activate': {
      const key = findKey(q.get('kid'));
      active[key.alg] = key.kid;
      return send(res, 204);
    }
    case 'POST /__test/unpublish':
      findKey(q.get('kid')).published = false;
      return send(res, 204);
    case 'POST /__test/publish':
      findKey(q.get('kid')).published = true;
      return send(res, 204);
    case 'POST /__test/down': {
      const endpoints = (q.get('endpoints') ?? 'discovery,jwks').split(',').filter(Boolean);
      for (const e of endpoints) {
        if (!['discovery', 'jwks', 'token'].includes(e)) throw new Error(`unknown endpoint ${e}`);
      }
      const status = Number(q.get('status') ?? 503);
      if (!Number.isInteger(status) || status < 400 || status > 599) throw new Error('status must be 4xx or 5xx');
      outage.endpoints = new Set(endpoints);
      outage.status = status;
      return send(res, 204);
    }
    case 'POST /__test/token-delay': {
      const ms = Number(q.get('ms') ?? '0');
      if (!Number.isInteger(ms) || ms < 0 || ms > 60000) throw new Error('ms must be an integer 0..60000');
      tokenDelayMs = ms;
      return send(res, 204);
    }
    case 'POST /__test/up':
      outage.endpoints = new Set();
      return send(res, 204);
    case 'GET /__test/stats':
      return send(res, 200, stats);
    case 'POST /__test/reset-stats':
      for (const k of Object.keys(stats)) stats[k] = 0;
      tokenRequests.length = 0;
      return send(res, 204);
    case 'GET /__test/keys':
      return send(res, 200, keys.map(keyView));
    case 'POST /__test/jwks-cache': {
      const v = q.get('max_age');
      if (v !== null && !/^\d+$/.test(v)) throw new Error('max_age must be a non-negative integer');
      jwksMaxAge = v === null ? undefined : Number(v);
      return send(res, 204);
    }
    case 'GET /__test/token-requests':
      return send(res, 200, tokenRequests);
    default: {
      const m = /^\/__test\/clients\/(.+)$/.exec(url.pathname);
      if (req.method === 'DELETE' && m) {
        clients.delete(decodeURIComponent(m[1]));
        return send(res, 204);
      }
      return send(res, 404, { error: `no control endpoint ${route}` });
    }
  }
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, issuer);
  if (url.pathname.startsWith('/__test/')) {
    try {
      await control(req, res, url);
    } catch (err) {
      send(res, err.status ?? 400, { error: err.error ?? 'bad_request', error_description: err.error_description ?? err.message });
    }
    return;
  }
  const endpoint = endpointOf(url.pathname);
  if (endpoint) {
    stats[endpoint] += 1;
    if (endpoint === 'token' && tokenDelayMs > 0) {
      await new Promise((resolve) => { setTimeout(resolve, tokenDelayMs); });
    }
    if (outage.endpoints.has(endpoint)) {
      req.resume();
      send(res, outage.status, { error: 'temporarily_unavailable', error_description: 'IdP outage (test switch)' });
      return;
    }
  }
  current.callback(req, res);
});

server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  issuer = `http://127.0.0.1:${port}`;
  addKey('RS256');
  addKey('ES256');
  current = buildProvider();
  process.stdout.write(`${JSON.stringify({
    issuer, port, jwks_uri: `${issuer}/jwks`, token_endpoint: `${issuer}/token`,
  })}\n`);
});

// Exit when the test that started us goes away.
process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
