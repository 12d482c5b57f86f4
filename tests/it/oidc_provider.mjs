// A real OpenID Connect provider for the delegation test: panva's `oidc-provider` (an
// OpenID Certified implementation, installed into .tools/ by scripts/test), with its
// development sign-in and consent pages, one confidential client (the broker), PKCE
// required, and accounts whose email is their login. Prints `listening PORT` once ready.
//
//   node oidc_provider.mjs NODE_MODULES CLIENT_ID CLIENT_SECRET REDIRECT_URI
import { pathToFileURL } from 'node:url';
import { join } from 'node:path';

const [modules, clientId, clientSecret, redirectUri] = process.argv.slice(2);
const { default: Provider } = await import(pathToFileURL(join(modules, 'oidc-provider', 'lib', 'index.js')).href);

const server = (await import('node:http')).createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const port = server.address().port;

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    redirect_uris: [redirectUri],
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return { sub: `sub-${id}`, email: id, email_verified: true, name: id };
      },
    };
  },
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'] },
  pkce: { required: () => true },
  cookies: { keys: ['periscope-oidc-test-cookie-key'] },
  features: { devInteractions: { enabled: true } },
});
// Plain http on loopback: the test's own machine.
provider.proxy = false;
server.on('request', provider.callback());
console.log(`listening ${port}`);
