// Loads tickd's API from ../../proto and connects a client.
const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const definition = protoLoader.loadSync("tickd/v1/scheduler.proto", {
  includeDirs: [path.join(__dirname, "..", "..", "proto")],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const tickd = grpc.loadPackageDefinition(definition).tickd.v1;

// A Scheduler client for tickd at `addr`, set up from the same environment variables as tickctl:
//   TICKD_ADDR             host:port, http://host:port, or https://host:port for TLS
//   TICKD_CA_FILE          PEM CA to verify tickd's certificate (default: the public roots)
//   TICKD_CLIENT_CERT/KEY  PEM client certificate and key, for mutual TLS
//   TICKD_TLS_SERVER_NAME  name the certificate must have, when not the address's host
//   TICKD_TOKEN            bearer token, sent as `authorization: Bearer <token>`
// TICKD_CA_FILE or TICKD_CLIENT_CERT imply TLS.
function connect(addr = process.env.TICKD_ADDR || "localhost:50051") {
  const env = process.env;
  const [, scheme, target] = addr.match(/^(?:([a-z]+):\/\/)?(.*)$/);
  const tls = scheme === "https" || Boolean(env.TICKD_CA_FILE || env.TICKD_CLIENT_CERT);
  if (tls && scheme === "http") {
    throw new Error(`TICKD_CA_FILE and TICKD_CLIENT_CERT need TLS; use https://${target}`);
  }
  if (Boolean(env.TICKD_CLIENT_CERT) !== Boolean(env.TICKD_CLIENT_KEY)) {
    throw new Error("set both TICKD_CLIENT_CERT and TICKD_CLIENT_KEY, or neither");
  }
  const token = (env.TICKD_TOKEN || "").trim();
  const withToken = (metadata) => metadata.set("authorization", `Bearer ${token}`);

  if (!tls) {
    // grpc-js sends call credentials only over TLS (they would leak the token), so an
    // interceptor adds it: for a server behind a proxy that ends TLS, or tests.
    const bearer = (options, nextCall) =>
      new grpc.InterceptingCall(nextCall(options), {
        start(metadata, listener, next) {
          withToken(metadata);
          next(metadata, listener);
        },
      });
    const options = token ? { interceptors: [bearer] } : {};
    return new tickd.Scheduler(target, grpc.credentials.createInsecure(), options);
  }

  const read = (name) => (env[name] ? fs.readFileSync(env[name]) : null);
  let credentials = grpc.credentials.createSsl(
    read("TICKD_CA_FILE"),
    read("TICKD_CLIENT_KEY"),
    read("TICKD_CLIENT_CERT"),
  );
  if (token) {
    const bearer = grpc.credentials.createFromMetadataGenerator((_call, callback) => {
      const metadata = new grpc.Metadata();
      withToken(metadata);
      callback(null, metadata);
    });
    credentials = grpc.credentials.combineChannelCredentials(credentials, bearer);
  }
  const options = {};
  if (env.TICKD_TLS_SERVER_NAME) {
    options["grpc.ssl_target_name_override"] = env.TICKD_TLS_SERVER_NAME;
  }
  return new tickd.Scheduler(target, credentials, options);
}

// "UNAUTHENTICATED: ..." for a failed call, the message for any other error.
function describe(err) {
  return err.code === undefined ? err.message : `${grpc.status[err.code]}: ${err.details}`;
}

module.exports = { connect, describe, grpc };
