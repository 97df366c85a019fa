// The Node example against a real tickd (the binary cargo built, or $TICKD_BIN): schedule a
// job and receive its fire.
const test = require("node:test");
const assert = require("node:assert");
const { spawn } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");

const { connect } = require("./tickd");
const { scheduleAfter } = require("./scheduler");
const { work } = require("./worker");

function startTickd() {
  const binary =
    process.env.TICKD_BIN || path.join(__dirname, "..", "..", "target", "debug", "tickd");
  const data = fs.mkdtempSync(path.join(os.tmpdir(), "tickd-node-"));
  const child = spawn(binary, [
    "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--data-dir", data,
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
