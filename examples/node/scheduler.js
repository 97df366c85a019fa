// Schedules a job on tickd: `node scheduler.js QUEUE [SECONDS]` fires once, SECONDS from now.
// TICKD_ADDR and, for a secured tickd, TICKD_CA_FILE, TICKD_CLIENT_CERT, TICKD_CLIENT_KEY,
// TICKD_TLS_SERVER_NAME and TICKD_TOKEN say how to reach it (see connect in tickd.js).
const { connect, describe } = require("./tickd");

function scheduleAfter(client, queue, seconds, payload = "", id = "") {
  const job = {
    id,
    queue,
    trigger: { after: { seconds, nanos: 0 } },
    payload: Buffer.from(payload),
    labels: { source: "node-example" },
  };
  return new Promise((resolve, reject) =>
    client.Schedule({ job }, { deadline: Date.now() + 30000 }, (err, created) =>
      err ? reject(err) : resolve(created),
    ),
  );
}

async function main() {
  const [queue = "emails", seconds = "2"] = process.argv.slice(2);
  const client = connect();
  const job = await scheduleAfter(client, queue, Number(seconds), "hello from node");
  console.log(`scheduled ${job.id} on ${job.queue}, state ${job.state}`);
  client.close();
}

if (require.main === module) {
  main().catch((err) => {
    console.error(`refused: ${describe(err)}`);
    process.exit(1);
  });
}

module.exports = { scheduleAfter };
