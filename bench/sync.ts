/**
 * Continuous sync: `npm run bench -- --only sync` (not part of the default run).
 *
 * 1. latency:  a `--watch` worker while another process inserts chat-like
 *              messages at a steady rate; latency from the database clock.
 * 2. rerun:    a one-shot `embed` and an `embed --reconcile` with nothing to
 *              do over 1,000,000 embedded messages, on stale statistics and
 *              after VACUUM ANALYZE, with EXPLAIN of the statements that scan.
 * 3. triggers: what the capture triggers cost the application's writes.
 * 4. size:     the coordination code before (HEAD) and after (working tree).
 *
 * Each part makes its own bench_sync_* database (or PGlite directory) and
 * drops it. Figures, not assertions.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type CompiledQuery, Kysely, PostgresDialect, sql } from 'kysely';
import pg from 'pg';
import { openDatabase } from '../src/db/connect.js';
import { readEmbeddingColumnType } from '../src/db/embedding-column.js';
import { migrateToLatest } from '../src/db/migrator.js';
import { DEFAULT_SOURCE } from '../src/db/names.js';
import type { DB } from '../src/db/schema.js';
import { WAKE_CHANNEL } from '../src/sql/capture.js';
import { type ClaimScope, claimBatch, claimOldest } from '../src/sql/queue.js';
import { reconcile } from '../src/sql/reconcile.js';
import { builtBinary, childEnv } from '../test/support/cli.js';
import { withAdminClient } from '../test/support/db.js';
import { type FakeOpenAI, startFakeOpenAI } from '../test/support/fake-openai.js';
import type { Backend } from './lib.js';

export interface SyncContext {
  serverUrl: string;
  backends: Backend[];
  /** Which parts: latency, rerun, triggers, size. */
  parts: Set<string>;
  /** Seconds the writer runs at each rate. */
  seconds: number;
  /** Messages a second the writer sustains, one run each. */
  rates: number[];
  /** Messages (and embeddings) bulk-loaded for the rerun. */
  rerunMessages: number;
  /** Time `embed --reconcile` on stale statistics too (minutes at 1 M). */
  staleReconcile: boolean;
  log: (text: string) => void;
  row: (...cells: Array<string | number>) => void;
  results: Record<string, unknown>;
  save: () => void;
}

// What the CLI uses by default with OPENAI_BASE_URL set.
const PROVIDER = 'openai';
const MODEL = 'text-embedding-3-small';
const fmt = (x: number, digits = 1) => x.toFixed(digits);
const int = (x: number) => Math.round(x).toLocaleString('en-US');

export async function syncBench(ctx: SyncContext): Promise<void> {
  const git = (...args: string[]) =>
    execFileSync('git', args, { cwd: repoRoot, encoding: 'utf8' }).trim();
  ctx.results.sync_source_tree = {
    head: git('rev-parse', '--short', 'HEAD'),
    uncommitted_in_src: git('status', '--porcelain', '--', 'src', 'migrations') !== '',
  };
  const fake = await startFakeOpenAI({ latencyMs: 0 });
  const onPostgres = ctx.backends.includes('postgres');
  const parts: Array<[string, boolean, () => Promise<void>]> = [
    ['size', true, () => codeSize(ctx)],
    ['latency', onPostgres, () => syncLatency(ctx, fake)],
    ['triggers', true, () => triggerOverhead(ctx)],
    ['rerun', onPostgres, () => rerunNothingToDo(ctx)],
  ];
  try {
    for (const [name, applies, part] of parts) {
      if (!ctx.parts.has(name) || !applies) continue;
      const before = machineState();
      // Whether a test suite ran at any point during the part, not only at its ends.
      let vitestSeen = before.vitest_running;
      const watch = setInterval(() => {
        vitestSeen ||= machineState().vitest_running;
      }, 2000);
      try {
        await part();
      } catch (error) {
        ctx.results[`sync_${name}_error`] = String((error as Error)?.stack ?? error);
        ctx.log(`sync: ${name} failed: ${(error as Error)?.stack ?? error}`);
      }
      clearInterval(watch);
      const after = machineState();
      vitestSeen ||= after.vitest_running;
      ctx.results[`sync_${name}_machine`] = { before, after, vitest_seen_during: vitestSeen };
      ctx.log(`sync: ${name} done; a test suite ran during it: ${vitestSeen}`);
      ctx.save();
    }
  } finally {
    await fake.close();
  }
}

/** Whether a test suite shares the cores (the figures are only fair without one). */
function machineState() {
  let vitest = false;
  try {
    vitest = execFileSync('pgrep', ['-f', 'vitest'], { encoding: 'utf8' }).trim() !== '';
  } catch {}
  return { vitest_running: vitest, loadavg: loadavg().map((x) => +x.toFixed(2)) };
}

// ---------------------------------------------------------------------------
// The CLI, as `npm run embed` starts it: the compiled `pgembed embed` (npm run bench builds it)

const repoRoot = fileURLToPath(new URL('..', import.meta.url));

interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/**
 * Starts `embed` as a child process with only PATH, HOME and `env`: every
 * setting's variable is present and blank unless given, so a developer's
 * .env (read without overriding the environment) changes nothing here.
 */
function startEmbed(args: string[], env: Record<string, string>, timeoutMs: number) {
  const child = spawn(process.execPath, [builtBinary, 'embed', ...args], {
    cwd: repoRoot,
    env: childEnv(env),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  const waiters = new Set<() => void>();
  child.stdout?.setEncoding('utf8');
  child.stderr?.setEncoding('utf8');
  child.stdout?.on('data', (chunk: string) => {
    stdout += chunk;
    for (const waiter of [...waiters]) waiter();
  });
  child.stderr?.on('data', (chunk: string) => {
    stderr += chunk;
  });
  const result = new Promise<CliResult>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`embed ${args.join(' ')} still running after ${timeoutMs} ms`));
    }, timeoutMs);
    child.on('error', reject);
    // 'close': the pipes are drained by then.
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      for (const waiter of [...waiters]) waiter();
      resolve({ code, signal, stdout, stderr });
    });
  });
  /** Resolves once a log record with this `msg` is on stdout; rejects if the child exits first. */
  const waitForLog = (msg: string, waitMs: number) =>
    new Promise<void>((resolve, reject) => {
      const check = () => {
        if (logRecords(stdout, msg).length > 0) return finish(resolve);
        if (child.exitCode !== null || child.signalCode !== null) {
          return finish(() =>
            reject(new Error(`embed exited before '${msg}': ${stderr.slice(-800)}`)),
          );
        }
      };
      const timer = setTimeout(
        () =>
          finish(() => reject(new Error(`no '${msg}' after ${waitMs} ms: ${stderr.slice(-800)}`))),
        waitMs,
      );
      const finish = (then: () => void) => {
        clearTimeout(timer);
        waiters.delete(check);
        then();
      };
      waiters.add(check);
      check();
    });
  return { child, result, waitForLog };
}

/** The pino records on stdout whose `msg` is `msg`. */
function logRecords(stdout: string, msg: string): Array<Record<string, unknown>> {
  return stdout
    .split('\n')
    .filter((line) => line.startsWith('{') && line.includes(msg))
    .map((line) => JSON.parse(line) as Record<string, unknown>)
    .filter((record) => record.msg === msg);
}

// ---------------------------------------------------------------------------
// Databases

function withDatabase(serverUrl: string, name: string): string {
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  return url.toString();
}

/** A fresh bench_sync_* database on the server, and how to drop it. */
async function serverDatabase(serverUrl: string, label: string) {
  const name = `bench_sync_${label}_${process.pid}`;
  await withAdminClient(serverUrl, async (c) => {
    await c.query(`drop database if exists ${name} with (force)`);
    await c.query(`create database ${name}`);
  });
  return {
    url: withDatabase(serverUrl, name),
    drop: () =>
      withAdminClient(serverUrl, (c) =>
        c.query(`drop database if exists ${name} with (force)`),
      ).then(() => undefined),
  };
}

/** pgembed's schema (messages, capture triggers) in place, as `npm run migrate` leaves it. */
async function migrate(url: string): Promise<void> {
  const database = await openDatabase(url);
  try {
    await migrateToLatest(database, { warn: () => {} });
  } finally {
    await database.close();
  }
}

/** Short chat-like text, the same expression in SQL for bulk loads. */
const CHAT_SQL = (g: string) =>
  `(array['can you move the standup to 3pm?', 'thanks, that fixed it', 'where is the invoice for march',
          'lgtm, merging now', 'the build is red again on main', 'ok see you tomorrow',
          'any update on the refund?', 'please send me the slides', 'I will be 10 minutes late',
          'the customer says the export is empty'])[1 + ${g} % 10] || ' #' || ${g}`;

// ---------------------------------------------------------------------------
// CPU accounting (Linux /proc, 100 ticks a second): where the two cores go.

const TICKS = 100;

function procTicks(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[11]) + Number(fields[12]);
  } catch {
    return 0;
  }
}

/** Every process's CPU ticks, and its name. */
function allTicks(): Map<number, { comm: string; ticks: number }> {
  const out = new Map<number, { comm: string; ticks: number }>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const comm = readFileSync(`/proc/${entry}/comm`, 'utf8').trim();
      out.set(Number(entry), { comm, ticks: procTicks(Number(entry)) });
    } catch {}
  }
  return out;
}

/** /proc/stat's first line: user, nice, system, idle, iowait, irq, softirq, steal (guest is in user). */
function machineTicks(): number[] {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0] ?? '';
  return line.trim().split(/\s+/).slice(1, 9).map(Number);
}

interface CpuSnapshot {
  at: number;
  pids: Map<string, number>;
  all: Map<number, { comm: string; ticks: number }>;
  bench: number;
  machine: number[];
}

function cpuSnapshot(pids: Record<string, number | undefined>): CpuSnapshot {
  const usage = process.cpuUsage();
  return {
    at: performance.now(),
    pids: new Map(
      Object.entries(pids).map(([name, pid]) => [name, pid === undefined ? 0 : procTicks(pid)]),
    ),
    all: allTicks(),
    bench: (usage.user + usage.system) / 1e6,
    machine: machineTicks(),
  };
}

/**
 * Cores used between two snapshots (1.0 = one core busy): by the named
 * processes, every postgres process, this process (the fake provider), the
 * machine as a whole by kind, and the busiest other processes.
 */
function cpuBetween(
  a: CpuSnapshot,
  b: CpuSnapshot,
  named: Record<string, number | undefined> = {},
) {
  const seconds = (b.at - a.at) / 1000;
  const out: Record<string, number> = {};
  for (const [name, ticks] of b.pids) {
    out[name] = (ticks - (a.pids.get(name) ?? 0)) / TICKS / seconds;
  }
  const mine = new Set([process.pid, ...Object.values(named)]);
  let pgTicks = 0;
  const others: Array<{ what: string; cores: number }> = [];
  for (const [pid, { comm, ticks }] of b.all) {
    const delta = ticks - (a.all.get(pid)?.ticks ?? 0);
    if (comm === 'postgres') pgTicks += delta;
    else if (!mine.has(pid) && delta > 0) {
      others.push({ what: `${comm} ${pid}`, cores: delta / TICKS / seconds });
    }
  }
  out.postgres = pgTicks / TICKS / seconds;
  out.bench_process_fake_server = (b.bench - a.bench) / seconds;
  const d = b.machine.map((x, i) => x - (a.machine[i] ?? 0));
  const total = d.reduce((x, y) => x + y, 0) || 1;
  const cores = cpus().length;
  const share = (...i: number[]) => (cores * i.reduce((x, k) => x + (d[k] ?? 0), 0)) / total;
  out.machine_user = share(0, 1);
  out.machine_system = share(2);
  out.machine_irq = share(5, 6);
  out.machine_steal = share(7);
  out.machine_idle = share(3, 4);
  out.other_processes = others.reduce((x, o) => x + o.cores, 0);
  others.sort((x, y) => y.cores - x.cores);
  return {
    cores: out,
    busiest_others: others.slice(0, 4).map((o) => `${o.what} ${o.cores.toFixed(2)}`),
  };
}

const cpuText = (cpu: Record<string, number>) =>
  Object.entries(cpu)
    .map(([k, v]) => `${k} ${fmt(v, 2)}`)
    .join(', ');

// ---------------------------------------------------------------------------
// 1. Sync latency

/**
 * The writer: its own process, `connections` connections, one row per
 * transaction (autocommit), message k due at start + k/rate. created_at is
 * clock_timestamp() as the row is formed: before the capture trigger runs and
 * before the commit, so the latency measured from it is, if anything, long.
 */
const WRITER = `
import pg from 'pg';
const { url, rate, seconds, idBase, connections, rowsPerTransaction: per } = JSON.parse(process.argv[1]);
const clients = [];
for (let i = 0; i < connections; i++) {
  const c = new pg.Client({ connectionString: url, application_name: 'bench writer' });
  await c.connect();
  clients.push(c);
}
const phrases = ['can you move the standup to 3pm?', 'thanks, that fixed it',
  'where is the invoice for march', 'lgtm, merging now', 'the build is red again on main',
  'ok see you tomorrow', 'any update on the refund?', 'please send me the slides',
  'I will be 10 minutes late', 'the customer says the export is empty'];
const total = Math.round(rate * seconds);
const start = performance.now() + 50;
let next = 0;
let behindMs = 0;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// One statement (so one transaction) of per rows: ($1, $2, $3, $4), ($5, ...
const text = 'insert into messages (id, content, role, conversation_id, created_at) values ' +
  Array.from({ length: per }, (_, i) =>
    '($' + (4 * i + 1) + ', $' + (4 * i + 2) + ', $' + (4 * i + 3) + ', $' + (4 * i + 4) +
    ', clock_timestamp())').join(', ');
async function loop(c) {
  for (;;) {
    const k = next;
    next += per;
    if (k >= total) return;
    // The group is due when its last message is.
    const wait = start + ((k + per - 1) * 1000) / rate - performance.now();
    if (wait > 1) await sleep(wait);
    else behindMs = Math.max(behindMs, -wait);
    const values = [];
    for (let j = k; j < k + per; j++) {
      values.push(idBase + j + 1, phrases[j % phrases.length] + ' (' + (j % 97) + ')',
        j % 2 ? 'user' : 'assistant', 'c' + (j % 50));
    }
    await c.query({ name: 'ins', text, values });
  }
}
await Promise.all(clients.map(loop));
const seconds_taken = (performance.now() - start) / 1000;
await Promise.all(clients.map((c) => c.end()));
process.stdout.write(JSON.stringify({ inserted: total, seconds: seconds_taken, max_behind_ms: behindMs }));
`;

interface WriterResult {
  inserted: number;
  seconds: number;
  max_behind_ms: number;
}

function startWriter(args: {
  url: string;
  rate: number;
  seconds: number;
  idBase: number;
  connections: number;
  rowsPerTransaction: number;
}): { child: ChildProcess; done: Promise<WriterResult> } {
  const child = spawn(
    process.execPath,
    ['--input-type=module', '-e', WRITER, JSON.stringify(args)],
    { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let out = '';
  let err = '';
  child.stdout?.on('data', (d) => {
    out += d;
  });
  child.stderr?.on('data', (d) => {
    err += d;
  });
  const done = new Promise<WriterResult>((resolve, reject) => {
    child.on('close', (code) => {
      if (code === 0) resolve(JSON.parse(out) as WriterResult);
      else reject(new Error(`writer exited ${code}: ${err.slice(-1000)}`));
    });
  });
  return { child, done };
}

/** Counts the capture triggers' NOTIFYs, as a worker's LISTEN connection hears them. */
async function notifyCounter(url: string) {
  const client = new pg.Client({ connectionString: url, application_name: 'bench listen' });
  await client.connect();
  const counter = { count: 0, close: () => client.end() };
  client.on('notification', (m) => {
    if (m.channel === WAKE_CHANNEL) counter.count++;
  });
  await client.query(`listen ${WAKE_CHANNEL}`);
  return counter;
}

/**
 * The batch's commit time: a deferred constraint trigger on
 * embedding_batches (one row per batch, in the batch's own transaction)
 * records clock_timestamp() as the transaction commits, keyed by its xid,
 * which is every embedding row's xmin. embedded_at is now(): the start of
 * that transaction.
 */
const COMMIT_CLOCK = `
  create table bench_commit_clock (xid bigint primary key, at timestamptz not null);
  create function bench_commit_clock() returns trigger language plpgsql as $$
  begin
    insert into bench_commit_clock values (txid_current() % 4294967296, clock_timestamp())
    on conflict do nothing;
    return null;
  end $$;
  create constraint trigger bench_commit_clock after insert on embedding_batches
    deferrable initially deferred for each row execute function bench_commit_clock();`;

// Connections the writer commits from: enough that WAL flushes, shared with
// the worker's commits, do not cap it below 1,000 single-row commits a second.
const WRITER_CONNECTIONS = 8;

async function syncLatency(ctx: SyncContext, fake: FakeOpenAI): Promise<void> {
  Object.assign(fake.options, { latencyMs: 0, maxTpm: undefined });
  const database = await serverDatabase(ctx.serverUrl, 'latency');
  const out: Record<string, unknown> = { writer_connections: WRITER_CONNECTIONS };
  // Each rate with the defaults; then the highest again with shorter vectors,
  // to tell the cost of writing 1,536 floats a row from the rest.
  const top = Math.max(...ctx.rates);
  // And the highest in transactions of 10 rows, which the server commits at
  // 1,000 a second beside the worker's writes (one row a transaction, it may not).
  const phases = [
    ...ctx.rates.map((rate) => ({ rate, per: 1, args: [] as string[] })),
    { rate: top, per: 10, args: [] as string[] },
    { rate: top, per: 10, args: ['--dimensions', '256'] },
  ];
  let worker: ReturnType<typeof startEmbed> | undefined;
  let workerArgs: string[] | undefined;
  let listener: Awaited<ReturnType<typeof notifyCounter>> | undefined;
  const stopWorker = async () => {
    worker?.child.kill('SIGTERM');
    await worker?.result.catch(() => undefined);
    worker = undefined;
  };
  try {
    await migrate(database.url);
    await withAdminClient(database.url, (c) => c.query(COMMIT_CLOCK));
    listener = await notifyCounter(database.url);
    const rows: unknown[] = [];
    for (const [i, { rate, per, args }] of phases.entries()) {
      if (!worker || workerArgs?.join(' ') !== args.join(' ')) {
        await stopWorker();
        ctx.log(`sync latency: starting a --watch worker (defaults ${args.join(' ')})`);
        workerArgs = args;
        worker = startEmbed(
          ['--watch', ...args],
          { DATABASE_URL: database.url, OPENAI_BASE_URL: fake.url, LOG_LEVEL: 'info' },
          60 * 60_000,
        );
        await worker.waitForLog('run started', 120_000);
        await new Promise((r) => setTimeout(r, 2000));
      }
      const label = `${rate}/s, ${per} row${per > 1 ? 's' : ''}/tx${args.length ? `, ${args.join(' ')}` : ''}`;
      const idBase = (i + 1) * 100_000_000;
      const notifiesBefore = listener.count;
      ctx.log(`sync latency: writer at ${label} for ${ctx.seconds} s`);
      const writer = startWriter({
        url: database.url,
        rate,
        seconds: ctx.seconds,
        idBase,
        connections: WRITER_CONNECTIONS,
        rowsPerTransaction: per,
      });
      const sampler = activitySampler(database.url);
      // CPU over the writing, sampled while the writer and its backends still live.
      const pids = { worker: worker.child.pid, writer: writer.child.pid };
      const before = cpuSnapshot(pids);
      const afterWrite = await new Promise<CpuSnapshot>((resolve) =>
        setTimeout(() => resolve(cpuSnapshot(pids)), Math.max(500, ctx.seconds * 1000 - 500)),
      );
      const written = await writer.done;
      const activity = await sampler.stop();
      const drainStart = performance.now();
      const drained = await waitEmbedded(database.url, idBase, written.inserted, 180_000);
      const drainMs = performance.now() - drainStart;
      const notifies = listener.count - notifiesBefore;
      const figures = await latencyFigures(database.url, idBase, idBase + written.inserted);
      const result = {
        rate,
        rows_per_transaction: per,
        worker_args: args,
        seconds: ctx.seconds,
        writer: written,
        drained_after_writer_ms: drained ? drainMs : null,
        notifies,
        cpu_while_writing: cpuBetween(before, afterWrite, pids),
        activity,
        ...figures,
      };
      rows.push(result);
      ctx.log(`sync latency ${label}: ${JSON.stringify(result)}`);
      const scenario = 'sync latency';
      ctx.row(
        scenario,
        'postgres',
        `${label}: p50 / p99 / max (commit → embedding commit)`,
        `${int(figures.p50_ms)} / ${int(figures.p99_ms)} / ${int(figures.max_ms)} ms`,
        rate === 1000 && !args.length ? 'goal p50 <= 250 ms, p99 <= 1,000 ms' : '',
      );
      ctx.row(
        scenario,
        'postgres',
        `${label}: inserted/s, embedded/s`,
        `${fmt(figures.inserted_per_s)}, ${fmt(figures.embedded_per_s)}`,
        `${figures.embedded} of ${figures.inserted} embedded; NOTIFYs ${notifies}`,
      );
      ctx.row(
        scenario,
        'postgres',
        `${label}: cores used while writing`,
        cpuText(result.cpu_while_writing.cores),
        '',
      );
      // Let the watcher go idle before the next rate.
      await new Promise((r) => setTimeout(r, 2000));
    }
    out.rates = rows;
  } finally {
    await stopWorker();
    await listener?.close().catch(() => undefined);
    if (process.env.BENCH_SYNC_KEEP) ctx.log(`sync latency: kept ${database.url}`);
    else await database.drop();
    ctx.results.sync_latency_postgres = out;
  }
}

/**
 * A profile of where the database connections spend the writing: every
 * 20 ms, what each of the worker's (application_name pgembed) and the
 * writer's connections is doing (state, wait event, statement); shares of
 * the samples, most frequent first.
 */
function activitySampler(url: string) {
  const counts = new Map<string, number>();
  const totals = new Map<string, number>();
  let stop = false;
  const running = withAdminClient(url, async (c) => {
    while (!stop) {
      const { rows } = await c.query<{ app: string; what: string }>(
        `select application_name as app,
           coalesce(state, 'starting') || coalesce(' / ' || wait_event_type || ':' || wait_event, '') || ' / ' ||
           left(regexp_replace(coalesce(query, ''), '\\s+', ' ', 'g'), 60) as what
         from pg_stat_activity
         where datname = current_database() and pid <> pg_backend_pid()
           and application_name in ('pgembed', 'bench writer')`,
      );
      for (const r of rows) {
        const key = `${r.app}: ${r.what.startsWith('idle / ') ? 'idle' : r.what}`;
        counts.set(key, (counts.get(key) ?? 0) + 1);
        totals.set(r.app, (totals.get(r.app) ?? 0) + 1);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  });
  return {
    async stop() {
      stop = true;
      await running;
      return [...counts]
        .map(([key, n]) => ({ key, share: n / (totals.get(key.split(':')[0] ?? '') ?? 1) }))
        .filter((x) => x.share >= 0.01)
        .sort((a, b) => b.share - a.share);
    },
  };
}

async function waitEmbedded(
  url: string,
  idBase: number,
  count: number,
  timeoutMs: number,
): Promise<boolean> {
  return withAdminClient(url, async (c) => {
    const deadline = performance.now() + timeoutMs;
    while (performance.now() < deadline) {
      const { rows } = await c.query<{ n: number }>(
        'select count(*)::int as n from message_embeddings where message_id > $1 and message_id <= $2',
        [idBase, idBase + count],
      );
      if ((rows[0]?.n ?? 0) >= count) return true;
      await new Promise((r) => setTimeout(r, 50));
    }
    return false;
  });
}

async function latencyFigures(url: string, lo: number, hi: number) {
  return withAdminClient(url, async (c) => {
    const { rows } = await c.query(
      `with l as (
         select m.created_at, c.at as committed_at, e.embedded_at,
           extract(epoch from (c.at - m.created_at)) * 1000 as commit_ms,
           extract(epoch from (e.embedded_at - m.created_at)) * 1000 as start_ms
         from messages m
         left join message_embeddings e on e.message_id = m.id
         left join bench_commit_clock c on c.xid = e.xmin::text::bigint
         where m.id > $1 and m.id <= $2)
       select count(*)::int as inserted, count(embedded_at)::int as embedded,
         count(committed_at)::int as with_commit_clock,
         percentile_cont(0.5) within group (order by commit_ms) as p50_ms,
         percentile_cont(0.9) within group (order by commit_ms) as p90_ms,
         percentile_cont(0.99) within group (order by commit_ms) as p99_ms,
         max(commit_ms) as max_ms,
         percentile_cont(0.5) within group (order by start_ms) as p50_embedded_at_ms,
         percentile_cont(0.99) within group (order by start_ms) as p99_embedded_at_ms,
         count(*) / extract(epoch from max(created_at) - min(created_at)) as inserted_per_s,
         count(committed_at) / extract(epoch from max(committed_at) - min(created_at)) as embedded_per_s
       from l`,
      [lo, hi],
    );
    const { rows: batches } = await c.query(
      `select count(*)::int as batches, avg(size)::float8 as avg_size, max(size) as max_size,
         percentile_cont(0.5) within group (order by latency_ms) as p50_request_ms
       from embedding_batches where first_message_id > $1 and first_message_id <= $2`,
      [lo, hi],
    );
    // The slowest messages, and how many later ids (later inserts) were
    // embedded before each: a straggler left behind by the claim's keyset.
    const { rows: worst } = await c.query(
      `with l as (
         select m.id, m.created_at, c.at as committed_at,
           extract(epoch from (c.at - m.created_at)) * 1000 as ms
         from messages m
         join message_embeddings e on e.message_id = m.id
         join bench_commit_clock c on c.xid = e.xmin::text::bigint
         where m.id > $1 and m.id <= $2)
       select w.id::text, round(w.ms)::int as ms,
         (select count(*)::int from l where l.id > w.id and l.committed_at < w.committed_at)
           as later_ids_embedded_first
       from (select * from l order by ms desc limit 5) w order by w.ms desc`,
      [lo, hi],
    );
    const r = rows[0] as Record<string, unknown>;
    const num = (k: string) => Number(r[k]);
    return {
      inserted: num('inserted'),
      embedded: num('embedded'),
      with_commit_clock: num('with_commit_clock'),
      p50_ms: num('p50_ms'),
      p90_ms: num('p90_ms'),
      p99_ms: num('p99_ms'),
      max_ms: num('max_ms'),
      p50_embedded_at_ms: num('p50_embedded_at_ms'),
      p99_embedded_at_ms: num('p99_embedded_at_ms'),
      inserted_per_s: num('inserted_per_s'),
      embedded_per_s: num('embedded_per_s'),
      batches: batches[0] as Record<string, unknown>,
      worst,
    };
  });
}

// ---------------------------------------------------------------------------
// 2. A rerun with nothing to do over 1 M embedded messages

async function rerunNothingToDo(ctx: SyncContext): Promise<void> {
  const n = ctx.rerunMessages;
  const database = await serverDatabase(ctx.serverUrl, 'rerun');
  const out: Record<string, unknown> = { messages: n };
  const scenario = 'sync rerun';
  try {
    await migrate(database.url);
    const columnType = await (async () => {
      const db = await openDatabase(database.url);
      try {
        return await readEmbeddingColumnType(db.db);
      } finally {
        await db.close();
      }
    })();
    out.embedding_column = columnType;
    ctx.log(`sync rerun: bulk-loading ${int(n)} messages and embeddings (${columnType})`);
    const load = await withAdminClient(database.url, async (c) => {
      // Statistics as the empty schema left them, and kept so: no autovacuum.
      await c.query('analyze');
      for (const table of [
        'messages',
        'message_embeddings',
        'embedding_queue',
        'embedding_skips',
      ]) {
        await c.query(`alter table ${table} set (autovacuum_enabled = false)`);
      }
      const started = performance.now();
      await c.query(
        `insert into messages (id, content, role, conversation_id, created_at)
         select g, ${CHAT_SQL('g')}, 'user', 'c' || (g % 1000), now()
         from generate_series(1, ${n}) g`,
      );
      const { rows: run } = await c.query<{ id: string }>(
        `insert into embedding_runs (provider, model, status, host, pid, finished_at)
         values ($1, $2, 'succeeded', 'bench', 0, now()) returning id::text`,
        [PROVIDER, MODEL],
      );
      const vector =
        columnType === 'real[]'
          ? `array_fill(0.01::real, array[16])`
          : `'[${Array(16).fill('0.01').join(',')}]'::${columnType}`;
      await c.query(
        `insert into message_embeddings
           (provider, model, message_id, embedding, dimensions, content_sha256, input_tokens, run_id)
         select $1, $2, m.id, ${vector}, 16, sha256(convert_to(m.content, 'UTF8')), 12, $3::bigint
         from messages m`,
        [PROVIDER, MODEL, run[0]?.id],
      );
      await c.query(
        `insert into embedding_targets (provider, model, backfilled_at) values ($1, $2, now())`,
        [PROVIDER, MODEL],
      );
      const { rows: missing } = await c.query<{ n: number }>(
        `select count(*)::int as n from messages m where not exists (
           select 1 from message_embeddings e where e.provider = $1 and e.model = $2
             and e.message_id = m.id and e.content_sha256 = sha256(convert_to(m.content, 'UTF8')))`,
        [PROVIDER, MODEL],
      );
      const { rows: stats } = await c.query(
        `select relname::text, reltuples::bigint, relpages,
           pg_size_pretty(pg_total_relation_size(oid)) as size
         from pg_class where relname in ('messages', 'message_embeddings', 'embedding_queue',
           'messages_pkey', 'message_embeddings_pkey') order by relname`,
      );
      return {
        seconds: (performance.now() - started) / 1000,
        missing: missing[0]?.n,
        stale_pg_class: stats,
      };
    });
    out.load = load;
    ctx.log(`sync rerun: loaded in ${fmt(load.seconds)} s; ${JSON.stringify(load)}`);
    if (load.missing !== 0) throw new Error(`${load.missing} messages lack a current embedding`);

    // Once on stale statistics: it takes minutes there (see explainScans).
    out.stale = await rerunFigures(
      ctx,
      database.url,
      'stale statistics',
      ctx.staleReconcile ? 1 : 0,
    );
    out.stale_explain = await explainScans(database.url);
    ctx.log(`sync rerun: EXPLAIN (stale)\n${JSON.stringify(out.stale_explain, null, 2)}`);
    ctx.save();
    ctx.log('sync rerun: VACUUM ANALYZE');
    const vacuumStart = performance.now();
    await withAdminClient(database.url, (c) => c.query('vacuum analyze'));
    out.vacuum_analyze_s = (performance.now() - vacuumStart) / 1000;
    out.analyzed = await rerunFigures(ctx, database.url, 'after VACUUM ANALYZE', 2);
    out.analyzed_explain = await explainScans(database.url);
    for (const [state, key] of [
      ['stale', 'stale'],
      ['analyzed', 'analyzed'],
    ] as const) {
      const f = out[key] as Awaited<ReturnType<typeof rerunFigures>>;
      ctx.row(
        scenario,
        'postgres',
        `${int(n)}, ${state}: one-shot embed, run elapsed (median of 3)`,
        `${int(f.oneShot.median_elapsed_ms)} ms`,
        `process wall ${int(f.oneShot.median_wall_ms)} ms; goal run < 1,000 ms`,
      );
      if (f.reconcile.runs.length === 0) continue;
      ctx.row(
        scenario,
        'postgres',
        `${int(n)}, ${state}: embed --reconcile, scan${f.reconcile.runs.length > 1 ? ` (median of ${f.reconcile.runs.length})` : ''}`,
        `${fmt(f.reconcile.median_scan_ms / 1000, 2)} s`,
        `process wall ${fmt(f.reconcile.median_wall_ms / 1000, 2)} s; goal scan < 30 s`,
      );
    }
  } finally {
    await database.drop();
    ctx.results.sync_rerun_postgres = out;
  }
}

function cliEnv(url: string): Record<string, string> {
  // The provider is never called (nothing to do); the URL only has to parse.
  return { DATABASE_URL: url, OPENAI_BASE_URL: 'http://127.0.0.1:9/v1', LOG_LEVEL: 'info' };
}

async function timedCli(args: string[], url: string) {
  const started = performance.now();
  const result = await startEmbed(args, cliEnv(url), 30 * 60_000).result;
  const wallMs = performance.now() - started;
  const finished = logRecords(result.stdout, 'run finished')[0];
  if (!finished || result.code !== 0) {
    throw new Error(`embed ${args.join(' ')} exited ${result.code}: ${result.stderr.slice(-800)}`);
  }
  const time = (r: Record<string, unknown> | undefined) =>
    r ? (typeof r.time === 'number' ? r.time : Date.parse(String(r.time))) : Number.NaN;
  const scanning = result.stdout
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .find((r) => String(r.msg).startsWith('reconciling'));
  const reconciled = logRecords(result.stdout, 'reconciled')[0];
  return {
    wall_ms: wallMs,
    elapsed_ms: Number(finished.elapsed_ms),
    scan_ms: reconciled ? time(reconciled) - time(scanning) : null,
    reconciled: reconciled ?? null,
    embedded: Number(finished.embedded),
  };
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
};

async function rerunFigures(ctx: SyncContext, url: string, state: string, reconcileRuns: number) {
  const oneShot = [];
  for (let i = 0; i < 3; i++) {
    ctx.log(`sync rerun (${state}): one-shot embed ${i + 1}/3`);
    oneShot.push(await timedCli([], url));
  }
  const recon = [];
  const reps = reconcileRuns;
  for (let i = 0; i < reps; i++) {
    ctx.log(`sync rerun (${state}): embed --reconcile ${i + 1}/${reps}`);
    const r = await timedCli(['--reconcile'], url);
    ctx.log(`sync rerun (${state}): scan ${r.scan_ms} ms, wall ${fmt(r.wall_ms)} ms`);
    recon.push(r);
  }
  return {
    oneShot: {
      runs: oneShot,
      median_elapsed_ms: median(oneShot.map((r) => r.elapsed_ms)),
      median_wall_ms: median(oneShot.map((r) => r.wall_ms)),
    },
    reconcile: {
      runs: recon,
      median_scan_ms: median(recon.map((r) => r.scan_ms ?? Number.NaN)),
      median_wall_ms: median(recon.map((r) => r.wall_ms)),
    },
  };
}

/**
 * EXPLAIN (ANALYZE, BUFFERS) of the statements src issues: the reconcile's
 * second chunk (its end read and its judging statement) and a claim of 64
 * rows, captured from src's own functions through a logging Kysely, then
 * explained with the same parameters in a transaction that rolls back.
 */
async function explainScans(url: string) {
  const pool = new pg.Pool({ connectionString: url, max: 2 });
  const queries: CompiledQuery[] = [];
  const db = new Kysely<DB>({
    dialect: new PostgresDialect({ pool }),
    log: (event) => {
      if (event.level === 'query') queries.push(event.query);
    },
  });
  try {
    const { rows } = await sql<{ id: number }>`
      select id from embedding_targets where provider = ${PROVIDER} and model = ${MODEL}`.execute(
      db,
    );
    const scope: ClaimScope = {
      targetId: Number(rows[0]?.id),
      runId: '999999999',
      provider: PROVIDER,
      model: MODEL,
      source: DEFAULT_SOURCE,
      idType: 'bigint',
      oneSession: false,
    };
    let chunks = 0;
    await reconcile(db, scope, {
      force: false,
      retrySkipped: false,
      onChunk: () => ++chunks < 2,
    });
    const ends = queries.filter((q) => q.sql.includes('as upper'));
    const judges = queries.filter((q) => q.sql.includes('with chunk as materialized'));
    // Claim the empty queue once each way to capture the statements.
    await claimBatch(db, scope, { after: null, limit: 64, ignoreBackoff: false });
    const claim = queries.find((q) => q.sql.includes('for update skip locked'));
    await claimOldest(db, scope, 64);
    const oldest = queries.find((q) => q.sql.includes('due_again'));
    const explain = async (q: CompiledQuery | undefined, setup?: string) => {
      if (!q) return null;
      const client = await pool.connect();
      try {
        await client.query('begin');
        if (setup) await client.query(setup);
        const { rows: plan } = await client.query<{ 'QUERY PLAN': string }>(
          `explain (analyze, buffers) ${q.sql}`,
          q.parameters as unknown[],
        );
        return plan.map((r) => r['QUERY PLAN']);
      } finally {
        await client.query('rollback');
        client.release();
      }
    };
    const judge = judges[1];
    return {
      reconcile_chunk_end: await explain(ends[1]),
      // As src/sql/reconcile.ts runs it: JIT off for the statement.
      reconcile_chunk: await explain(judge, 'set local jit = off'),
      reconcile_chunk_sql: judges[1]?.sql ?? null,
      claim_empty_queue: await explain(claim),
      claim_64_queued: await explain(
        claim,
        `insert into embedding_queue (target_id, message_id)
         select ${scope.targetId}, g from generate_series(500001, 500064) g`,
      ),
      // A watcher's claim, with 64 rows queued and one backing off, due again.
      claim_oldest_64_queued: await explain(
        oldest,
        `insert into embedding_queue (target_id, message_id, not_before, attempts)
         select ${scope.targetId}, g, case when g = 500001 then now() - interval '1 second' end,
           case when g = 500001 then 1 else 0 end
         from generate_series(500001, 500064) g`,
      ),
    };
  } finally {
    await db.destroy();
  }
}

// ---------------------------------------------------------------------------
// 3. Trigger overhead

const BULK = 100_000;

async function triggerOverhead(ctx: SyncContext): Promise<void> {
  const out: Record<string, unknown> = {};
  const scenario = 'sync triggers';
  for (const backend of ctx.backends) {
    let url: string;
    let drop: () => Promise<void>;
    if (backend === 'postgres') {
      const database = await serverDatabase(ctx.serverUrl, 'triggers');
      url = database.url;
      drop = database.drop;
    } else {
      const dir = mkdtempSync(join(tmpdir(), 'bench-sync-triggers-'));
      url = `pglite:${dir}`;
      drop = async () => rmSync(dir, { recursive: true, force: true });
    }
    try {
      const database = await openDatabase(url);
      const bulk: Record<string, number[]> = { triggers: [], bare: [] };
      try {
        await migrateToLatest(database, { warn: () => {} });
        const db = database.db;
        await sql`insert into embedding_targets (provider, model, backfilled_at)
                  values (${PROVIDER}, ${MODEL}, now())`.execute(db);
        // The same table without the capture triggers.
        await sql`create table messages_bare (like messages including all)`.execute(db);
        for (let rep = 0; rep < 3; rep++) {
          const order = rep % 2 ? ['bare', 'triggers'] : ['triggers', 'bare'];
          for (const which of order) {
            await sql`truncate embedding_queue`.execute(db);
            await sql`truncate messages`.execute(db);
            await sql`truncate messages_bare`.execute(db);
            const table = which === 'triggers' ? 'messages' : 'messages_bare';
            const started = performance.now();
            await sql
              .raw(`insert into ${table} (id, content, role, conversation_id)
                    select g, ${CHAT_SQL('g')}, 'user', 'c' || (g % 1000)
                    from generate_series(1, ${BULK}) g`)
              .execute(db);
            bulk[which]?.push(performance.now() - started);
            const { rows } = await sql<{ n: number }>`
              select count(*)::int as n from embedding_queue`.execute(db);
            const queued = which === 'triggers' ? BULK : 0;
            if (rows[0]?.n !== queued) throw new Error(`queue holds ${rows[0]?.n}, not ${queued}`);
          }
        }
      } finally {
        await database.close();
      }
      const summary = (xs: number[]) => ({
        runs_ms: xs,
        min_ms: Math.min(...xs),
        median_ms: median(xs),
      });
      const result: Record<string, unknown> = {
        bulk_triggers: summary(bulk.triggers ?? []),
        bulk_bare: summary(bulk.bare ?? []),
      };
      const t = result.bulk_triggers as ReturnType<typeof summary>;
      const b = result.bulk_bare as ReturnType<typeof summary>;
      ctx.row(
        scenario,
        backend,
        `INSERT … SELECT of ${int(BULK)} rows, min / median`,
        `triggers ${int(t.min_ms)} / ${int(t.median_ms)} ms; bare ${int(b.min_ms)} / ${int(b.median_ms)} ms`,
        `${fmt(t.median_ms / b.median_ms, 2)}x by median`,
      );
      if (backend === 'postgres') {
        result.single_row = await singleRowInserts(ctx, url);
      }
      out[backend] = result;
      ctx.log(`sync triggers ${backend}: ${JSON.stringify(result)}`);
    } finally {
      await drop();
    }
  }
  ctx.results.sync_triggers = out;
}

/**
 * Single-row inserts, one per transaction, from 4 connections for 10 s:
 * into the bare copy; into messages with the triggers and an idle queue
 * that only grows (the wake-up gate shut after the first); and into messages
 * with the queue emptied every few milliseconds, as a worker that keeps up
 * would, so the gate opens and most commits NOTIFY.
 */
async function singleRowInserts(ctx: SyncContext, url: string) {
  const seconds = 10;
  const out: Record<string, unknown> = {};
  let idBase = 10_000_000;
  for (const variant of ['bare', 'triggers, queue growing', 'triggers, queue drained'] as const) {
    const table = variant === 'bare' ? 'messages_bare' : 'messages';
    await withAdminClient(url, async (c) => {
      await c.query('truncate embedding_queue');
      await c.query('truncate messages');
      await c.query('truncate messages_bare');
      await c.query('checkpoint');
    });
    const listener = await notifyCounter(url);
    const clients = await Promise.all(
      Array.from({ length: 4 }, async () => {
        const c = new pg.Client({ connectionString: url });
        await c.connect();
        return c;
      }),
    );
    let stop = false;
    let next = idBase;
    idBase += 10_000_000;
    let drains = 0;
    const drain =
      variant === 'triggers, queue drained'
        ? withAdminClient(url, async (c) => {
            while (!stop) {
              await c.query('delete from embedding_queue');
              drains++;
              await new Promise((r) => setTimeout(r, 5));
            }
          })
        : Promise.resolve();
    const started = performance.now();
    const before = cpuSnapshot({});
    const timer = setTimeout(() => {
      stop = true;
    }, seconds * 1000);
    let inserted = 0;
    await Promise.all(
      clients.map(async (c) => {
        while (!stop) {
          const id = next++;
          await c.query({
            name: `ins-${table}`,
            text: `insert into ${table} (id, content, role, conversation_id) values ($1, $2, 'user', 'c1')`,
            values: [id, `ok see you tomorrow (${id % 97})`],
          });
          inserted++;
        }
      }),
    );
    clearTimeout(timer);
    const elapsed = (performance.now() - started) / 1000;
    const cpu = cpuBetween(before, cpuSnapshot({}));
    await drain;
    await Promise.all(clients.map((c) => c.end()));
    await new Promise((r) => setTimeout(r, 200));
    const notifies = listener.count;
    await listener.close();
    const perSecond = inserted / elapsed;
    out[variant] = { inserted, seconds: elapsed, per_s: perSecond, notifies, drains, cpu };
    ctx.row(
      'sync triggers',
      'postgres',
      `single-row inserts/s, 4 connections, ${variant}`,
      fmt(perSecond, 0),
      `NOTIFYs ${notifies}${variant === 'triggers, queue drained' ? `, queue emptied ${drains} times` : ''}`,
    );
  }
  return out;
}

// ---------------------------------------------------------------------------
// 4. Code size

const BEFORE = [
  'src/worker/range-leases.ts',
  'src/sql/ranges.ts',
  'src/worker/watermark.ts',
  'migrations/0003_range_leases.ts',
  'src/worker/pipeline.ts',
  'src/worker/run.ts',
  'src/worker/commit.ts',
];
const AFTER = [
  'src/sql/queue.ts',
  'src/sql/capture.ts',
  'src/sql/reconcile.ts',
  'src/worker/breaker.ts',
  'migrations/0005_change_queue.ts',
  'src/worker/pipeline.ts',
  'src/worker/run.ts',
  'src/worker/commit.ts',
];

/**
 * Non-blank lines that are not comments: a line counts unless it is empty,
 * inside a block comment (JSDoc included), or starts with `//` or, inside SQL
 * text, `--`. A line with code and a trailing comment counts.
 */
export function codeLines(text: string): number {
  let inBlock = false;
  let count = 0;
  for (const raw of text.split('\n')) {
    let line = raw.trim();
    if (inBlock) {
      const end = line.indexOf('*/');
      if (end === -1) continue;
      inBlock = false;
      line = line.slice(end + 2).trim();
    }
    while (line.startsWith('/*')) {
      const end = line.indexOf('*/', 2);
      if (end === -1) {
        inBlock = true;
        line = '';
        break;
      }
      line = line.slice(end + 2).trim();
    }
    if (line === '' || line.startsWith('//') || line.startsWith('--')) continue;
    count++;
  }
  return count;
}

async function codeSize(ctx: SyncContext): Promise<void> {
  const count = (files: string[], read: (f: string) => string) =>
    Object.fromEntries(
      files.map((f) => {
        const text = read(f);
        return [f, { code: codeLines(text), lines: text.split('\n').length - 1 }];
      }),
    );
  // Before: the commit before the one that deleted the range leases (HEAD
  // while the redesign is uncommitted).
  const git = (...args: string[]) =>
    execFileSync('git', args, { cwd: repoRoot, encoding: 'utf8', maxBuffer: 1 << 26 });
  const deleting = git(
    'log',
    '-1',
    '--format=%H',
    '--diff-filter=D',
    '--',
    'src/worker/range-leases.ts',
  ).trim();
  const base = deleting ? `${deleting}^` : 'HEAD';
  const before = count(BEFORE, (f) => git('show', `${base}:${f}`));
  const after = count(AFTER, (f) =>
    existsSync(join(repoRoot, f)) ? readFileSync(join(repoRoot, f), 'utf8') : '',
  );
  const total = (side: Record<string, { code: number; lines: number }>) =>
    Object.values(side).reduce((a, b) => ({ code: a.code + b.code, lines: a.lines + b.lines }), {
      code: 0,
      lines: 0,
    });
  const result = {
    before_commit: git('rev-parse', '--short', base).trim(),
    after_commit: git('rev-parse', '--short', 'HEAD').trim(),
    after_uncommitted_changes: git('status', '--porcelain', '--', ...AFTER).trim() !== '',
    before,
    after,
    before_total: total(before),
    after_total: total(after),
  };
  ctx.results.sync_code_size = result;
  ctx.log(`sync size: ${JSON.stringify(result)}`);
  ctx.row(
    'sync code size',
    '-',
    'coordination code, non-blank non-comment lines',
    `${result.before_total.code} -> ${result.after_total.code}`,
    `all lines ${result.before_total.lines} -> ${result.after_total.lines}`,
  );
}
