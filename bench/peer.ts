import { execFileSync, spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { isWithinTokenLimit } from 'gpt-tokenizer/encoding/cl100k_base';
import { openDatabase } from '../src/db/connect.js';
import { repoRoot } from '../test/support/cli.js';
import { runWorker, type Template } from './lib.js';

const PEER_DIR = join(repoRoot, 'bench', 'peer');
// Enough for a stable rate, few enough that LangChain finishes in minutes.
const MESSAGES = Number(process.env.BENCH_PEER_MESSAGES ?? 2000);
const PLAIN = { disallowedSpecial: new Set<string>() };

export type PeerOutcome =
  | { skipped: string }
  | {
      messages: number;
      langchain_messages_per_s: number;
      pgembed_messages_per_s: number;
      ratio: number;
      /**
       * The socket server's CPU over each tool's run, in cores (1 = one core
       * busy throughout): near 1, the one PGlite session behind the socket
       * binds that run. Null where /proc cannot tell.
       */
      server_cores: { langchain: number | null; pgembed: number | null };
      langchain: Record<string, unknown>;
    };

/** A process's CPU time so far (user + system), ms; undefined without Linux's /proc. */
function cpuMsOf(pid: number | undefined): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th,
    // in clock ticks (100 a second on Linux).
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) * 10;
  } catch {
    return undefined;
  }
}

/** Runs `work` and says how many cores process `pid` kept busy meanwhile. */
async function coresDuring<T>(
  pid: number | undefined,
  work: () => Promise<T>,
): Promise<[T, number | null]> {
  const cpuBefore = cpuMsOf(pid);
  const startedAt = performance.now();
  const result = await work();
  const cpuAfter = cpuMsOf(pid);
  const wallMs = performance.now() - startedAt;
  return [
    result,
    cpuBefore === undefined || cpuAfter === undefined ? null : (cpuAfter - cpuBefore) / wallMs,
  ];
}

/**
 * LangChain.js's index() and pgembed on the same messages, the same test
 * server and the same PGlite served over a socket (PGVectorStore needs pg).
 * Only messages within the 8,192-token limit: LangChain sends over-long ones
 * and fails the whole call, so it is measured on the subset it can embed.
 */
function runNode(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, {
      cwd: PEER_DIR,
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    child.stdout.on('data', (chunk: Buffer) => {
      out += chunk.toString();
    });
    child.once('error', reject);
    child.once('exit', (code) =>
      code === 0 ? resolve(out) : reject(new Error(`${args[0]} exited with ${code}`)),
    );
  });
}

export async function runPeer(
  template: Template,
  baseUrl: string,
  log: (text: string) => void,
  /** pgembed's own flags beyond the batch size and the one connection. */
  pgembedArgs: string[] = [],
): Promise<PeerOutcome> {
  if (!existsSync(join(PEER_DIR, 'node_modules'))) {
    log('installing the peer package in bench/peer (first use)');
    try {
      execFileSync('npm', ['ci', '--no-audit', '--no-fund'], { cwd: PEER_DIR, stdio: 'inherit' });
    } catch (error) {
      return { skipped: `npm ci in bench/peer failed: ${(error as Error).message}` };
    }
  }
  const copy = await template.copy();
  const dataDir = copy.url.slice('pglite:'.length);
  const database = await openDatabase(copy.url);
  try {
    const rows = await database.db
      .selectFrom('messages')
      .select(['id', 'content'])
      .orderBy('id')
      .execute();
    const over = rows
      .filter((r) => isWithinTokenLimit(r.content, 8192, PLAIN) === false)
      .map((r) => r.id);
    for (let i = 0; i < over.length; i += 500) {
      await database.db
        .deleteFrom('messages')
        .where('id', 'in', over.slice(i, i + 500))
        .execute();
    }
  } finally {
    await database.close();
  }

  const port = 20_000 + Math.floor(Math.random() * 20_000);
  const server = spawn(process.execPath, ['serve.mjs', dataDir, String(port)], {
    cwd: PEER_DIR,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  try {
    await new Promise<void>((resolve, reject) => {
      server.stdout.on('data', (chunk: Buffer) => {
        if (chunk.toString().includes('listening')) resolve();
      });
      server.once('exit', (code) => reject(new Error(`peer server exited with ${code}`)));
    });
    const url = `postgres://postgres@127.0.0.1:${port}/postgres`;
    log(`peer: LangChain index() on ${MESSAGES} messages`);
    // Asynchronous: the test server answering LangChain lives in this process.
    const [out, langchainCores] = await coresDuring(server.pid, () =>
      runNode(['index.mjs', url, baseUrl, '8', String(MESSAGES)]),
    );
    const langchain = JSON.parse(out.trim().split('\n').at(-1) as string) as Record<string, number>;
    const langchainRate = Number(langchain.messages) / (Number(langchain.elapsedMs) / 1000);
    log(`peer: pgembed on the same ${MESSAGES} messages through the same socket`);
    // One connection, as for LangChain: the socket serves one session at a time.
    const [ours, pgembedCores] = await coresDuring(server.pid, () =>
      runWorker(url, baseUrl, [
        '--limit',
        String(MESSAGES),
        '--batch-size',
        '8',
        '--db-pool-size',
        '1',
        ...pgembedArgs,
      ]),
    );
    return {
      messages: MESSAGES,
      langchain_messages_per_s: langchainRate,
      pgembed_messages_per_s: ours.messagesPerSecond,
      ratio: ours.messagesPerSecond / langchainRate,
      server_cores: { langchain: langchainCores, pgembed: pgembedCores },
      langchain,
    };
  } finally {
    server.kill('SIGTERM');
    await copy.drop();
  }
}
