// The Node example against a real tickd (the binary cargo built, or $TICKD_BIN): schedule a
// job and receive its fire; then the scripts against secured servers, configured only by the
// environment variables tickctl reads (certificates made here with node-forge: no key is
// committed).
const test = require("node:test");
const assert = require("node:assert");
const { execFile, spawn } = require("node:child_process");
const crypto = require("node:crypto");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const forge = require("node-forge");

const { connect } = require("./tickd");
const { scheduleAfter } = require("./scheduler");
const { work } = require("./worker");

function startTickd(...args) {
  const binary =
    process.env.TICKD_BIN || path.join(__dirname, "..", "..", "target", "debug", "tickd");
  const data = fs.mkdtempSync(path.join(os.tmpdir(), "tickd-node-"));
  const child = spawn(binary, [
    "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--data-dir", data, ...args,
  ], { env: { ...process.env, TICKD_LOG: "info", TICKD_LOG_FORMAT: "text" } });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error("tickd did not log its address"));
    }, 20000);
    let buffered = "";
    child.stdout.on("data", (chunk) => {
      buffered += chunk;
      const m = buffered.match(/\baddr=(\S+)/);
      if (m) {
        clearTimeout(timer);
        resolve({ child, addr: m[1] });
      }
    });
  });
}

test("schedule a job and receive its fire", { timeout: 60000 }, async () => {
  const { child, addr } = await startTickd();
  try {
    const client = connect(addr);
    const job = await scheduleAfter(client, "node.example", 1, "hi", "node-once");
    assert.strictEqual(job.state, "JOB_STATE_SCHEDULED");
    const fires = [];
    await work(client, "node.example", 1, (fire) => fires.push(fire), 30000);
    assert.strictEqual(fires[0].job_id, "node-once");
    assert.strictEqual(fires[0].payload.toString(), "hi");
    assert.strictEqual(fires[0].labels.source, "node-example");
    client.close();
  } finally {
    child.kill("SIGTERM");
  }
});

// The token the scripts send, and an auth file that knows it: its principal may manage and
// consume the node.* queues and nothing else. The client certificate's CN is no principal, so
// a call without the token is UNAUTHENTICATED.
const TOKEN = "example-token-0123456789";
const AUTH_FILE = `principals:
  - name: example-app
    token_sha256: ${crypto.createHash("sha256").update(TOKEN).digest("hex")}
    rules:
      - {verbs: [manage, read, consume], queues: ["node.*"]}
`;

// A directory with a CA (ca.crt), a server certificate for `localhost` (server.crt,
// server.key), a client certificate with CN example-client (client.crt, client.key) and the
// auth file (auth.yaml), made on first use; returns the path of a file in it.
let securedFiles;
function securedFile(name) {
  securedFiles ??= makeSecuredFiles();
  return path.join(securedFiles, name);
}

function makeSecuredFiles() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tickd-node-pki-"));
  const write = (name, text) => fs.writeFileSync(path.join(dir, name), text);
  const caKeys = forge.pki.rsa.generateKeyPair(2048);
  const caName = [{ name: "commonName", value: "tickd example CA" }];
  const certificate = (cn, keys, extensions) => {
    const cert = forge.pki.createCertificate();
    cert.publicKey = keys.publicKey;
    cert.serialNumber = `01${crypto.randomBytes(8).toString("hex")}`;
    cert.validity.notBefore = new Date(Date.now() - 5 * 60 * 1000);
    cert.validity.notAfter = new Date(Date.now() + 24 * 60 * 60 * 1000);
    cert.setSubject([{ name: "commonName", value: cn }]);
    cert.setIssuer(caName);
    cert.setExtensions(extensions);
    cert.sign(caKeys.privateKey, forge.md.sha256.create());
    return forge.pki.certificateToPem(cert);
  };
  write("ca.crt", certificate("tickd example CA", caKeys, [
    { name: "basicConstraints", cA: true, critical: true },
    { name: "keyUsage", keyCertSign: true, cRLSign: true, digitalSignature: true, critical: true },
  ]));
  for (const [name, cn, extensions] of [
    ["server", "localhost", [
      { name: "subjectAltName", altNames: [{ type: 2 /* DNS */, value: "localhost" }] },
      { name: "extKeyUsage", serverAuth: true },
    ]],
    ["client", "example-client", [{ name: "extKeyUsage", clientAuth: true }]],
  ]) {
    const keys = forge.pki.rsa.generateKeyPair(2048);
    write(`${name}.key`, forge.pki.privateKeyToPem(keys.privateKey));
    write(`${name}.crt`, certificate(cn, keys, [
      { name: "basicConstraints", cA: false, critical: true },
      ...extensions,
    ]));
  }
  write("auth.yaml", AUTH_FILE);
  return dir;
}

// Runs an example script with only `env`'s TICKD_* settings; resolves to its exit code and
// output.
function run(script, args, env) {
  const clean = Object.fromEntries(
    Object.entries(process.env).filter(([name]) => !name.startsWith("TICKD_")),
  );
  return new Promise((resolve) => {
    execFile(
      process.execPath, [script, ...args],
      { cwd: __dirname, env: { ...clean, ...env }, timeout: 60000 },
      (err, stdout, stderr) => resolve({ code: err ? err.code : 0, stdout, stderr }),
    );
  });
}

function without(env, ...names) {
  return Object.fromEntries(Object.entries(env).filter(([name]) => !names.includes(name)));
}

test("the scripts over TLS with mutual TLS and a token", { timeout: 120000 }, async (t) => {
  const { child, addr } = await startTickd(
    "--tls-cert", securedFile("server.crt"), "--tls-key", securedFile("server.key"),
    "--tls-client-ca", securedFile("ca.crt"), "--auth-file", securedFile("auth.yaml"),
  );
  // The address is 127.0.0.1; the certificate says localhost.
  const env = {
    TICKD_ADDR: `https://${addr}`,
    TICKD_CA_FILE: securedFile("ca.crt"),
    TICKD_CLIENT_CERT: securedFile("client.crt"),
    TICKD_CLIENT_KEY: securedFile("client.key"),
    TICKD_TLS_SERVER_NAME: "localhost",
    TICKD_TOKEN: TOKEN,
  };
  try {
    await t.test("schedule, then receive and ack the fire", async () => {
      const scheduled = await run("scheduler.js", ["node.tls", "1"], env);
      assert.strictEqual(scheduled.code, 0, scheduled.stderr);
      assert.match(scheduled.stdout, /scheduled \S+ on node\.tls/);
      // A bare host:port: TICKD_CA_FILE alone makes it TLS.
      const worked = await run("worker.js", ["node.tls", "1"], { ...env, TICKD_ADDR: addr });
      assert.strictEqual(worked.code, 0, worked.stderr);
      assert.match(worked.stdout, /: hello from node/);
    });

    await t.test("without the token calls are UNAUTHENTICATED", async () => {
      const refused = await run("scheduler.js", ["node.tls"], without(env, "TICKD_TOKEN"));
      assert.strictEqual(refused.code, 1);
      assert.match(refused.stderr, /refused: UNAUTHENTICATED/);
      const stopped = await run("worker.js", ["node.tls", "1"], without(env, "TICKD_TOKEN"));
      assert.strictEqual(stopped.code, 1);
      assert.match(stopped.stderr, /error: UNAUTHENTICATED/);
    });

    await t.test("a queue not granted is PERMISSION_DENIED", async () => {
      const refused = await run("scheduler.js", ["payroll"], env);
      assert.strictEqual(refused.code, 1);
      assert.match(refused.stderr, /refused: PERMISSION_DENIED: .*"payroll"/);
    });

    await t.test("without the client certificate the connection is refused", async () => {
      const noCert = without(env, "TICKD_CLIENT_CERT", "TICKD_CLIENT_KEY");
      const refused = await run("scheduler.js", ["node.tls"], noCert);
      assert.strictEqual(refused.code, 1);
      assert.match(refused.stderr, /refused: UNAVAILABLE/);
    });
  } finally {
    child.kill("SIGTERM");
  }
});

test("the scripts with a token over plaintext", { timeout: 60000 }, async () => {
  const { child, addr } = await startTickd("--auth-file", securedFile("auth.yaml"));
  const env = { TICKD_ADDR: addr, TICKD_TOKEN: TOKEN };
  try {
    const scheduled = await run("scheduler.js", ["node.plain", "1"], env);
    assert.strictEqual(scheduled.code, 0, scheduled.stderr);
    const worked = await run("worker.js", ["node.plain", "1"], env);
    assert.strictEqual(worked.code, 0, worked.stderr);
    assert.match(worked.stdout, /: hello from node/);
    const refused = await run("scheduler.js", ["node.plain"], without(env, "TICKD_TOKEN"));
    assert.match(refused.stderr, /refused: UNAUTHENTICATED/);
  } finally {
    child.kill("SIGTERM");
  }
});
