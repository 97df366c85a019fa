// Receives a queue's fires from tickd and acks each: `node worker.js QUEUE [COUNT]`.
// TICKD_ADDR and, for a secured tickd, TICKD_CA_FILE, TICKD_CLIENT_CERT, TICKD_CLIENT_KEY,
// TICKD_TLS_SERVER_NAME and TICKD_TOKEN say how to reach it (see connect in tickd.js).
const { connect, describe } = require("./tickd");

// With `timeoutMs`, the subscription ends with DEADLINE_EXCEEDED (and the promise rejects)
// after that long.
function work(client, queue, count, handle = console.log, timeoutMs = 0) {
  return new Promise((resolve, reject) => {
    const options = timeoutMs ? { deadline: Date.now() + timeoutMs } : {};
    const stream = client.Subscribe(options);
    let done = 0;
    stream.on("data", (fire) => {
      handle(fire);
      stream.write({ ack: { fire_ids: [fire.fire_id] } });
      done += 1;
      if (count && done >= count) {
        // Let the ack leave before closing the stream.
        setTimeout(() => stream.cancel(), 100);
        resolve(done);
      }
    });
    stream.on("error", (err) => {
      if (err.code !== 1 /* CANCELLED, by us */) reject(err);
    });
    stream.write({ open: { queue, max_in_flight: 10 } });
  });
}

async function main() {
  const [queue = "emails", count] = process.argv.slice(2);
  const client = connect();
  await work(client, queue, count ? Number(count) : 0, (fire) =>
    console.log(`fire ${fire.fire_id} (attempt ${fire.attempt}): ${fire.payload.toString()}`),
  );
  client.close();
}

if (require.main === module) {
  main().catch((err) => {
    console.error(`error: ${describe(err)}`);
    process.exit(1);
  });
}

module.exports = { work };
