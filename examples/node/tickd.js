// Loads tickd's API from ../../proto and connects a client.
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

function connect(addr = process.env.TICKD_ADDR || "localhost:50051") {
  return new tickd.Scheduler(addr, grpc.credentials.createInsecure());
}

module.exports = { connect, grpc };
