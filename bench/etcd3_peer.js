// etcd3_peer.js: the npm `etcd3` client's lock, uncontended.
//
// N concurrent loops in one process, sharing one Etcd3 client (one gRPC
// channel), as an application would.  Each loop takes and releases its own
// lock name for --secs seconds:
//
//   const lock = client.lock(name);
//   await lock.acquire();   // lease grant + txn (create if absent, attached to the lease)
//   await lock.release();   // lease revoke
//
// Prints one line:
//   RESULT ops=N secs=S ops_s=X p50_ms=Y p99_ms=Z errors=E
//
// usage: node etcd3_peer.js --url http://127.0.0.1:2379 --clients 8 --secs 5 [--prefix P]
// etcd3 is resolved through NODE_PATH (run.sh installs it in a temp dir).
'use strict';

const { Etcd3 } = require('etcd3');

function parseArgs(argv) {
  const o = { url: null, clients: 1, secs: 5, prefix: 'bench/npm/' };
  for (let i = 2; i < argv.length; i += 2) {
    const k = argv[i].replace(/^--/, '');
    if (!(k in o) || i + 1 >= argv.length) {
      console.error('usage: node etcd3_peer.js --url URL [--clients N] [--secs S] [--prefix P]');
      process.exit(2);
    }
    o[k] = k === 'url' || k === 'prefix' ? argv[i + 1] : Number(argv[i + 1]);
  }
  if (!o.url) {
    console.error('--url is required');
    process.exit(2);
  }
  return o;
}

function pct(sorted, p) {
  if (sorted.length === 0) return 0;
  return sorted[Math.round(p * (sorted.length - 1))];
}

async function main() {
  const o = parseArgs(process.argv);
  const client = new Etcd3({ hosts: o.url });
  // connect before the clock starts, as the C drivers grant their lease first
  await client.get('bench/warmup').string();

  const lat = [];
  let errors = 0;
  let lastError = null;
  const nowMs = () => Number(process.hrtime.bigint()) / 1e6;
  const start = nowMs();
  const deadline = start + o.secs * 1000;
  let end = start;

  async function loop(id) {
    const name = o.prefix + id;
    while (nowMs() < deadline) {
      const t0 = nowMs();
      try {
        const lock = client.lock(name);
        await lock.acquire();
        await lock.release();
        lat.push(nowMs() - t0);
      } catch (err) {
        errors++;
        lastError = err;
        return;
      }
    }
    end = Math.max(end, nowMs());
  }

  const loops = [];
  for (let i = 0; i < o.clients; i++) loops.push(loop(i));
  await Promise.all(loops);
  end = Math.max(end, nowMs());
  client.close();

  if (lastError) console.error('last error:', lastError.message || lastError);
  lat.sort((a, b) => a - b);
  const secs = (end - start) / 1000;
  console.log(
    `RESULT ops=${lat.length} secs=${secs.toFixed(3)} ops_s=${(lat.length / secs).toFixed(1)} ` +
      `p50_ms=${pct(lat, 0.5).toFixed(3)} p99_ms=${pct(lat, 0.99).toFixed(3)} errors=${errors}`
  );
  process.exit(errors > 0 || lat.length === 0 ? 1 : 0);
}

main().catch(err => {
  console.error(err);
  process.exit(1);
});
