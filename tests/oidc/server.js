// A real third-party OAuth2 authorization server for rekeyd's integration
// tests, built on the npm package `oidc-provider` (pinned in package.json).
//
// Protocol with the test harness (tests/support/oidc.rs):
//   * stdout carries exactly ONE line, `LISTENING <port>`, printed once the
//     server accepts connections. Everything else (oidc-provider notices,
//     request log) goes to stderr.
//   * SIGTERM / SIGINT -> exit 0.
//
// Configuration (all optional):
//   argv[2] or OIDC_PORT  port to bind on 127.0.0.1 (default 0 = ephemeral)
//   OIDC_BASIC_SECRET     secret of the default client `basic-client`
//                         (token_endpoint_auth_method client_secret_basic)
//   OIDC_POST_SECRET      secret of the default client `post-client`
//                         (token_endpoint_auth_method client_secret_post)
//   OIDC_CLIENTS          JSON array of client metadata; replaces the two
//                         default clients entirely
//   OIDC_TOKEN_TTL        lifetime (seconds) of client_credentials access
//                         tokens, i.e. `expires_in` (default 600)
//   OIDC_STRICT_AUTH_METHOD  "0" to turn off the strict auth-method check
//                         described below (default on)
//   OIDC_LOG_ASSERTIONS   "1": every /token request that carries a
//                         `client_assertion` (RFC 7523 private_key_jwt, or
//                         a platform's assertion) logs one stderr line
//                         `ASSERTION <status> <client_assertion>` once it
//                         is answered, so a test can see which assertion
//                         (jti, kid, alg) the server was sent and what it
//                         answered. A client is registered for
//                         private_key_jwt through OIDC_CLIENTS with
//                         `token_endpoint_auth_method: "private_key_jwt"`,
//                         `jwks: {keys: [<public JWK>]}` and optionally
//                         `token_endpoint_auth_signing_alg`.
//   OIDC_JWKS_URI_FRESH   seconds a client's key set fetched from its
//                         jwks_uri is trusted (default: oidc-provider's own,
//                         at least 60 s, longer when the reply's
//                         Cache-Control max-age or Expires says so). Once
//                         that has passed, an assertion whose kid the set
//                         lacks makes the server fetch the set again
//                         (lib/helpers/jwt.js), so a newly published key is
//                         accepted that much later; tests of key rotation
//                         shorten it rather than wait a minute.
//   OIDC_REGISTRATION_FILE   turns on RFC 7591 dynamic registration and RFC
//                         7592 registration management (the registration
//                         access token is replaced by every update) and
//                         writes two initial access tokens there as JSON,
//                         before LISTENING: {"initial_access_token",
//                         "rotating_initial_access_token"}. A client
//                         registered with the second one gets a new
//                         client_secret from every update too (a
//                         registration policy, which RFC 7592 §2.2 allows).
//                         OIDC_KEEP_REGISTRATION_TOKEN=1 keeps the token
//                         across updates instead (rotation off).
//                         `POST /__test/drop-next-update-reply` makes the
//                         next successful update commit and then close the
//                         connection without a reply (a lost reply).
//
// Endpoints (oidc-provider defaults, issuer = http://127.0.0.1:<port>):
//   POST /token                     token endpoint
//   POST /token/introspection       RFC 7662 introspection (client auth needed)
//   GET  /.well-known/openid-configuration   discovery
//
// Observed behaviour (oidc-provider 9.13.3, verified with curl):
//   * grant_type=client_credentials [&scope=api:read] -> 200
//       {"access_token":"<43 chars opaque>","expires_in":600,
//        "token_type":"Bearer","scope":"api:read"}
//     Without resource indicators (no `resource` param, no defaultResource)
//     the token is opaque and introspectable. Scopes that are not listed in
//     `scopes` below are silently dropped, not rejected.
//   * introspection as the owning client -> 200 {"active":true,
//       "client_id":"basic-client","exp":..,"iat":..,"iss":..,
//       "scope":"api:read","token_type":"Bearer"}
//     unknown/expired token -> 200 {"active":false}
//   * wrong secret, client_secret_basic -> 401
//       {"error":"invalid_client","error_description":"client authentication failed"}
//     plus `WWW-Authenticate: Basic realm=..., error="invalid_client", ...`
//   * wrong secret, client_secret_post -> 401 with the same body (no
//     WWW-Authenticate header, since no Authorization header was sent)
//   * unknown client_id -> 401 invalid_client
//   * no credentials at all -> 400 {"error":"invalid_request",
//       "error_description":"no client authentication mechanism provided"}
//   * Basic credentials are form-urlencoding-decoded (RFC 6749 2.3.1): a
//     secret containing '%' or '+' must be encoded by the client, or it
//     fails (400 invalid_request / 401 invalid_client).
//   * STOCK oidc-provider accepts client_secret_basic AND client_secret_post
//     interchangeably for a client registered with either method. To let
//     tests catch a client using the wrong method, this server (unless
//     OIDC_STRICT_AUTH_METHOD=0) rejects that mismatch on /token and
//     /token/revocation (not on introspection) itself with 401
//     invalid_client, error_description "the provided authentication
//     mechanism does not match the registered client authentication method".

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import http from 'node:http';

// oidc-provider prints its NOTICEs with console.info (i.e. to stdout). stdout
// is reserved for the LISTENING line, so route all console output to stderr
// *before* oidc-provider is loaded (hence the dynamic import below).
for (const level of ['log', 'info', 'debug']) {
  console[level] = (...args) => console.error(...args);
}

// Start-up stages go to stderr so a harness that times out waiting for
// LISTENING can show how far the server got.
const stage = (msg) => process.stderr.write(`oidc test server: ${msg}\n`);
stage('loading oidc-provider');
const { default: Provider } = await import('oidc-provider');
stage('oidc-provider loaded');

function fail(msg) {
  process.stderr.write(`oidc test server: ${msg}\n`);
  process.exit(2);
}

const portArg = process.argv[2] ?? process.env.OIDC_PORT ?? '0';
const port = Number.parseInt(portArg, 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  fail(`invalid port ${JSON.stringify(portArg)}`);
}

const tokenTtl = Number.parseInt(process.env.OIDC_TOKEN_TTL ?? '600', 10);
if (!Number.isInteger(tokenTtl) || tokenTtl <= 0) {
  fail(`invalid OIDC_TOKEN_TTL ${JSON.stringify(process.env.OIDC_TOKEN_TTL)}`);
}

const strictAuthMethod = process.env.OIDC_STRICT_AUTH_METHOD !== '0';
const logAssertions = process.env.OIDC_LOG_ASSERTIONS === '1';

function defaultClients() {
  const basic = process.env.OIDC_BASIC_SECRET;
  const post = process.env.OIDC_POST_SECRET;
  if (!basic || !post) {
    fail('OIDC_BASIC_SECRET and OIDC_POST_SECRET must be set (or OIDC_CLIENTS given)');
  }
  const base = {
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
  };
  return [
    { ...base, client_id: 'basic-client', client_secret: basic, token_endpoint_auth_method: 'client_secret_basic' },
    { ...base, client_id: 'post-client', client_secret: post, token_endpoint_auth_method: 'client_secret_post' },
  ];
}

let clients;
if (process.env.OIDC_CLIENTS) {
  try {
    clients = JSON.parse(process.env.OIDC_CLIENTS);
  } catch (err) {
    fail(`OIDC_CLIENTS is not valid JSON: ${err.message}`);
  }
  if (!Array.isArray(clients)) fail('OIDC_CLIENTS must be a JSON array');
} else {
  clients = defaultClients();
}
const authMethodOf = new Map(
  clients.map((c) => [c.client_id, c.token_endpoint_auth_method ?? 'client_secret_basic']),
);

// Fresh signing key per run (avoids oidc-provider's "dev keys" notice; the
// key is not used for opaque client_credentials tokens anyway).
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
stage('signing key generated');
const signingJwk = { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: 'test' };

// Bind first so the issuer can carry the real port; the provider is attached
// to the already-listening server afterwards.
const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, '127.0.0.1', resolve);
});
const actualPort = server.address().port;
stage(`bound to 127.0.0.1:${actualPort}`);
const issuer = `http://127.0.0.1:${actualPort}`;

const registrationFile = process.env.OIDC_REGISTRATION_FILE;
const registrationFeatures = registrationFile ? {
  registration: {
    enabled: true,
    initialAccessToken: true,
    policies: {
      // Runs on registration and, for clients registered with an initial
      // access token carrying it, on every update: a new secret per update.
      'rotate-secret': async (ctx, properties) => {
        if (ctx.method === 'PUT') {
          properties.client_secret = randomBytes(32).toString('base64url');
        }
      },
    },
  },
  registrationManagement: {
    enabled: true,
    rotateRegistrationAccessToken: process.env.OIDC_KEEP_REGISTRATION_TOKEN !== '1',
  },
} : {};

const provider = new Provider(issuer, {
  clients,
  // oidc-provider refuses to fetch from special-use addresses, loopback
  // included (SSRF protection, lib/helpers/fetch_request.js, by the
  // dispatcher it passes here); a test's jwks_uri is on loopback.
  fetch: (url, options) => {
    if (new URL(url).hostname === '127.0.0.1') delete options.dispatcher;
    return globalThis.fetch(url, options);
  },
  jwks: { keys: [signingJwk] },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  scopes: ['openid', 'offline_access', 'api:read', 'api:write', 'api:admin'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: {
      enabled: true,
      // Any confidentially authenticated client may introspect (so a client
      // can introspect its own tokens, and e.g. basic-client can introspect
      // post-client's). Same as the default policy, minus its NOTICE.
      allowedPolicy: async (ctx, client, token) => (
        client.clientAuthMethod !== 'none' || token.clientId === client.clientId
      ),
    },
    revocation: { enabled: true },
    ...registrationFeatures,
    // resourceIndicators stays at its default (enabled, no defaultResource):
    // a client_credentials request without `resource` yields an opaque token.
  },
  ttl: {
    ClientCredentials: tokenTtl,
  },
});

const jwksUriFresh = process.env.OIDC_JWKS_URI_FRESH;
if (jwksUriFresh !== undefined) {
  const fresh = Number.parseInt(jwksUriFresh, 10);
  if (!Number.isInteger(fresh) || fresh < 0) fail(`invalid OIDC_JWKS_URI_FRESH ${JSON.stringify(jwksUriFresh)}`);
  // Static clients are kept as one instance each, and so is their key
  // store: cap the freshness each refresh of it sets.
  const { Client } = provider;
  const find = Client.find.bind(Client);
  Client.find = async (id) => {
    const client = await find(id);
    const keystore = client?.jwksUri ? client.asymmetricKeyStore : undefined;
    if (keystore && !keystore.capped) {
      const refresh = keystore.refresh.bind(keystore);
      keystore.refresh = async () => {
        await refresh();
        keystore.freshUntil = Math.min(keystore.freshUntil, Math.floor(Date.now() / 1000) + fresh);
      };
      keystore.capped = true;
    }
    return client;
  };
}

function decodeBasicClientId(header) {
  const [scheme, value] = header.split(' ');
  if (scheme?.toLowerCase() !== 'basic' || !value) return undefined;
  const decoded = Buffer.from(value, 'base64').toString('utf8');
  const i = decoded.indexOf(':');
  if (i === -1) return undefined;
  try {
    return decodeURIComponent(decoded.slice(0, i).replace(/\+/g, '%20'));
  } catch {
    return undefined;
  }
}

// Strict token_endpoint_auth_method enforcement (see header comment). Runs
// before oidc-provider's own handlers. Applies to the token and revocation
// endpoints (what the code under test calls), NOT to introspection, which the
// test harness uses with HTTP Basic for any client.
const authenticatedPaths = new Set(['/token', '/token/revocation']);
provider.use(async (ctx, next) => {
  let assertion;
  if ((strictAuthMethod || logAssertions) && ctx.method === 'POST' && authenticatedPaths.has(ctx.path)) {
    const auth = ctx.get('authorization');
    const usedBasic = auth !== '';
    let clientId;
    let usedPost = false;
    if (usedBasic) {
      clientId = decodeBasicClientId(auth);
    } else if (ctx.is('application/x-www-form-urlencoded')) {
      const raw = await readBody(ctx.req);
      const form = new URLSearchParams(raw);
      clientId = form.get('client_id') ?? undefined;
      usedPost = form.has('client_secret');
      assertion = form.get('client_assertion') ?? undefined;
      // The stream is drained now; oidc-provider's body parser falls back to
      // req.body for a non-readable request (it logs a one-off warning).
      ctx.req.body = raw;
    }
    const registered = clientId !== undefined ? authMethodOf.get(clientId) : undefined;
    if (
      strictAuthMethod && (
        (usedBasic && registered === 'client_secret_post')
        || (usedPost && registered === 'client_secret_basic')
      )
    ) {
      ctx.status = 401;
      ctx.set('Cache-Control', 'no-store');
      ctx.body = {
        error: 'invalid_client',
        error_description: 'the provided authentication mechanism does not match the registered client authentication method',
      };
      process.stderr.write(`${ctx.method} ${ctx.path} -> 401 (auth method mismatch for ${clientId})\n`);
      return;
    }
  }
  await next();
  process.stderr.write(`${ctx.method} ${ctx.path} -> ${ctx.status}\n`);
  if (logAssertions && assertion !== undefined && ctx.path === '/token') {
    process.stderr.write(`ASSERTION ${ctx.status} ${assertion}\n`);
  }
});

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

// Lost replies of registration updates (see OIDC_REGISTRATION_FILE): the
// update commits, then the connection closes before the reply is sent.
let dropUpdateReplies = 0;
provider.use(async (ctx, next) => {
  if (registrationFile && ctx.method === 'POST' && ctx.path === '/__test/drop-next-update-reply') {
    dropUpdateReplies += 1;
    ctx.status = 204;
    return;
  }
  await next();
  if (ctx.method === 'PUT' && ctx.path.startsWith('/reg/') && ctx.status === 200 && dropUpdateReplies > 0) {
    dropUpdateReplies -= 1;
    process.stderr.write(`${ctx.method} ${ctx.path} -> committed, reply dropped\n`);
    ctx.req.socket.destroy();
  }
});

if (registrationFile) {
  const { writeFileSync } = await import('node:fs');
  const plain = await new provider.InitialAccessToken({}).save();
  const rotating = await new provider.InitialAccessToken({ policies: ['rotate-secret'] }).save();
  writeFileSync(registrationFile, JSON.stringify({
    initial_access_token: plain,
    rotating_initial_access_token: rotating,
  }));
  stage('registration enabled');
}

server.on('request', provider.callback());

process.stdout.write(`LISTENING ${actualPort}\n`);
process.stderr.write(`oidc test server: issuer ${issuer}, ${clients.length} client(s), token ttl ${tokenTtl}s\n`);

function shutdown(signal) {
  process.stderr.write(`oidc test server: ${signal}, exiting\n`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
